from __future__ import annotations

from service.api.security import TokenBucketLimiter
from tests.service.conftest import metric_value, serve


def test_api_keys_guard_every_v1_route(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(api_keys="alpha-key,beta-key")) as service, service.client() as client:
        for method, path in (
            ("GET", "/v1/tasks"),
            ("GET", "/v1/tasks/x"),
            ("GET", "/v1/adapters/abc"),
            ("POST", "/v1/adapters"),
        ):
            missing = client.request(method, path, json={"description": "x"})
            assert missing.status_code == 401, path
            assert missing.json()["error"]["type"] == "authentication_error"
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, json={"description": "x"}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 403, path
        assert client.get("/v1/tasks", headers={"Authorization": "Basic alpha-key"}).status_code == 401
        for key in ("alpha-key", "beta-key"):
            assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # probes and the scraper need no key
        assert client.get("/healthz").status_code == 200
        metrics = client.get("/metrics").text
    assert "alpha-key" not in metrics
    assert metric_value(metrics, "icm_lora_requests_total", route="/v1/tasks", status="401") >= 2
    assert metric_value(metrics, "icm_lora_requests_total", route="/v1/tasks/{task_id}", status="403") == 1


def test_rate_limit_per_key(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(api_keys="k1,k2", rate_limit_per_minute=3)
    with serve(settings) as service, service.client() as client:
        k1 = {"Authorization": "Bearer k1"}
        statuses = [client.get("/v1/tasks", headers=k1).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = client.get("/v1/tasks", headers=k1)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limited"
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer k2"}).status_code == 200  # per key


def test_rate_limiter_refills() -> None:
    limiter = TokenBucketLimiter(per_minute=60)
    states = [limiter.hit("a") for _ in range(60)]
    assert all(s.allowed and s.limit == 60 for s in states)
    assert [s.remaining for s in states[:3]] == [59, 58, 57] and states[-1].remaining == 0
    refused = limiter.hit("a")
    assert not refused.allowed and 0 < refused.retry_after_s <= 1.0 and 59 < refused.reset_s <= 60
    assert refused.headers()["Retry-After"] == "1" and refused.headers()["X-RateLimit-Remaining"] == "0"
    tokens, last = limiter._buckets["a"]
    limiter._buckets["a"] = (tokens, last - 2.0)  # two seconds later: two tokens back
    assert limiter.hit("a").allowed and limiter.hit("a").allowed and not limiter.hit("a").allowed


def test_cors_closed_by_default(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        preflight = client.options(
            "/v1/tasks", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in preflight.headers
        assert (
            "access-control-allow-origin"
            not in client.get("/v1/tasks", headers={"Origin": "https://evil.example"}).headers
        )


def test_every_response_carries_a_request_id(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(max_body_bytes=2048)) as service, service.client() as client:
        generated = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(generated) == 3 and all(len(r) == 32 for r in generated)
        assert client.get("/v1/tasks/nope", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        too_large = client.post("/v1/tasks", content=b"x" * 4096, headers={"X-Request-Id": "big.1"})
        assert too_large.status_code == 413 and too_large.headers["x-request-id"] == "big.1"
        hostile = client.get("/healthz", headers={"X-Request-Id": "a" * 500})
        assert hostile.headers["x-request-id"] != "a" * 500
