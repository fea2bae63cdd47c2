"""HTTP semantics over real HTTP: digests of the bytes served, one ETag per format, If-None-Match, Content-Length,
invalid JSON, Accept negotiation, X-RateLimit-* headers."""

from __future__ import annotations

import hashlib
import json

from tests.service.conftest import serve

SPEC = {
    "description": "Decide whether the listed words are fruits or animals.",
    "examples": [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
}


def test_digests_etags_and_conditional_downloads(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        meta = client.post("/v1/adapters", json=SPEC).json()
        weights = f"/v1/adapters/{meta['adapter_id']}/weights"
        zipped = client.get(weights)
        bare = client.get(weights, params={"format": "safetensors"})
        for response, fmt in ((zipped, "zip"), (bare, "safetensors")):
            assert response.status_code == 200
            digest = hashlib.sha256(response.content).hexdigest()
            assert digest == meta["sha256"][fmt], fmt  # checks the download itself
            assert response.headers["etag"] == f'"{digest}"'
            assert int(response.headers["content-length"]) == len(response.content)
        assert zipped.headers["etag"] != bare.headers["etag"]  # one ETag per representation
        assert meta["tensors_sha256"] not in (meta["sha256"]["zip"], meta["sha256"]["safetensors"])
        assert client.get(f"/v1/adapters/{meta['adapter_id']}").json()["sha256"] == meta["sha256"]

        current = client.get(weights, headers={"If-None-Match": zipped.headers["etag"]})
        assert current.status_code == 304 and current.content == b""
        assert current.headers["etag"] == zipped.headers["etag"]
        listed = client.get(weights, headers={"If-None-Match": f'"other", W/{zipped.headers["etag"]}'})
        assert listed.status_code == 304
        assert client.get(weights, headers={"If-None-Match": "*"}).status_code == 304
        other_format = client.get(weights, headers={"If-None-Match": bare.headers["etag"]})
        assert other_format.status_code == 200 and other_format.content == zipped.content
        bare_again = client.get(
            weights, params={"format": "safetensors"}, headers={"If-None-Match": bare.headers["etag"]}
        )
        assert bare_again.status_code == 304

        # the POST that answers with the zip serves the same bytes under the same ETag
        posted = client.post("/v1/adapters", json=SPEC, headers={"Accept": "application/zip"})
        assert posted.content == zipped.content and posted.headers["etag"] == zipped.headers["etag"]


def test_invalid_json_is_a_400_with_a_readable_message(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        for path, body in (
            ("/v1/tasks", b'{"description": "x",}'),
            ("/v1/adapters", b"{'description': 'x'}"),
            ("/v1/chat/completions", b'{"model": "tiny", "messages": ['),
        ):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_json", error
            assert (
                error["message"].startswith("the request body is not valid JSON: ")
                and "at character" in error["message"]
            ), error
        # valid JSON of the wrong shape stays a 422
        assert client.post("/v1/tasks", json=["x"]).status_code == 422


def test_accept_negotiation(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        meta = client.post("/v1/adapters", json=SPEC, headers={"Accept": "application/json"}).json()
        weights = f"/v1/adapters/{meta['adapter_id']}/weights"
        refused = [
            ("GET", "/v1/tasks", {"Accept": "text/html"}),
            ("GET", f"/v1/adapters/{meta['adapter_id']}", {"Accept": "application/zip"}),
            ("GET", weights, {"Accept": "application/json"}),
            ("GET", weights + "?format=safetensors", {"Accept": "application/zip"}),
            ("POST", "/v1/adapters", {"Accept": "image/png"}),
            ("GET", "/v1/models", {"Accept": "text/csv"}),
        ]
        for method, path, headers in refused:
            response = client.request(method, path, json=SPEC if method == "POST" else None, headers=headers)
            assert response.status_code == 406, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "not_acceptable" and headers["Accept"] in error["message"], error
        # what a route offers is taken, with wildcards and q-values
        assert client.get(weights, headers={"Accept": "application/*"}).headers["content-type"] == "application/zip"
        best = client.post("/v1/adapters", json=SPEC, headers={"Accept": "application/json;q=0.5, application/zip"})
        assert best.headers["content-type"] == "application/zip"
        assert client.get("/v1/tasks", headers={"Accept": "*/*"}).status_code == 200
        assert client.get("/v1/tasks", headers={"Accept": "text/html, application/json;q=0.1"}).status_code == 200
        streamed = client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "Input: kiwi\nOutput:", "max_tokens": 2, "stream": True},
            headers={"Accept": "text/event-stream"},
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        malformed = client.get("/v1/tasks", headers={"Accept": "nonsense"})
        assert malformed.status_code == 400 and "Accept" in malformed.json()["error"]["message"]


def test_rate_limit_headers_on_every_limited_route(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(rate_limit_per_minute=4)) as service, service.client() as client:
        responses = [
            client.get("/v1/tasks"),
            client.post("/v1/adapters", json={"description": "Colors or tools?"}),
            client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "Input: kiwi\nOutput:", "max_tokens": 2, "stream": True},
            ),
            client.get("/v1/models"),
        ]
        assert [r.status_code for r in responses] == [200, 200, 200, 200]
        assert [r.headers["x-ratelimit-limit"] for r in responses] == ["4"] * 4
        assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["3", "2", "1", "0"]
        assert all(1 <= int(r.headers["x-ratelimit-reset"]) <= 60 for r in responses)
        refused = client.get("/v1/adapters")
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
        assert refused.headers["x-ratelimit-limit"] == "4" and refused.headers["x-ratelimit-remaining"] == "0"
        assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["x-ratelimit-reset"]) >= 1
        # probes, the scraper and the playground are not rate limited and say nothing about it
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            response = client.get(path)
            assert response.status_code == 200 and "x-ratelimit-limit" not in response.headers, path
    with serve(settings_for()) as service, service.client() as client:  # no limit configured: no headers
        assert "x-ratelimit-limit" not in client.get("/v1/tasks").headers
        assert json.loads(client.get("/v1/tasks").text)["data"] == []
