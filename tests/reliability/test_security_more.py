"""Security beyond tests/service/test_security.py (which covers four routes with keys, per-key rate limits, CORS
closed by default and request ids): every /v1 route found in the app, keys in logs, rate-limit identities, CORS when
configured, and ids that look like paths."""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

from tests.reliability.conftest import ROOT, serve

KEY, OTHER_KEY, WRONG_KEY = "sk-alpha-5f3a9c", "sk-beta-81d2e0", "sk-wrong-000000"
# "/": the playground page (static; the API calls it makes need a key like any other)
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/"}


def _routes(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(method, path template) of every route, included routers walked (recent FastAPI keeps them as nodes)."""
    out: list[tuple[str, str]] = []

    def walk(routes, prefix: str) -> None:  # type: ignore[no-untyped-def]
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
                continue
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)  # "{id:path}" is "{id}" in OpenAPI
            for method in sorted((getattr(route, "methods", None) or set()) - {"HEAD", "OPTIONS"}):
                out.append((method, path))

    walk(app.routes, "")
    return out


def test_every_v1_route_requires_a_key(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(api_keys=f"{KEY},{OTHER_KEY}")) as service, service.client() as client:
        routes = _routes(service.app)
        v1 = [(m, p) for m, p in routes if p.startswith("/v1/") or p == "/v1"]
        documented = {(m.upper(), p) for p, ops in service.app.openapi()["paths"].items() for m in ops}
        assert documented <= set(routes), "the walk found every documented operation"
        assert len(v1) >= 10
        assert {p for _, p in routes} - {p for _, p in v1} <= PUBLIC, "a new unauthenticated route"
        for method, template in v1:
            path = re.sub(r"\{[^}]+\}", "some-id", template)
            body = {"json": {"description": "x"}} if method in {"POST", "PUT", "PATCH"} else {}
            missing = client.request(method, path, **body)
            assert missing.status_code == 401, (method, path, missing.text)
            wrong = client.request(method, path, headers={"Authorization": f"Bearer {WRONG_KEY}"}, **body)
            assert wrong.status_code == 403, (method, path)
            right = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, **body)
            assert right.status_code not in {401, 403}, (method, path, right.text)
        print(f"FIGURE auth: {len(v1)} /v1 operations, each 401 without a key, 403 with a wrong one")


def test_api_keys_never_logged(settings_for, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record) + (record.exc_text or ""))

    handler = Collect(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error", "service", "fastapi")]
    old = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
    bodies: list[str] = []
    try:
        settings = settings_for(api_keys=f"{KEY},{OTHER_KEY}", rate_limit_per_minute=5)
        with serve(settings) as service, service.client() as client:
            state = service.app.state.icm
            for headers in (
                {"Authorization": f"Bearer {KEY}"},
                {"Authorization": f"Bearer {WRONG_KEY}"},
                {"Authorization": f"Basic {KEY}"},
                {"Authorization": f"Bearer {KEY} trailing"},
                {"Authorization": KEY},
                {"X-Api-Key": KEY},
            ):
                bodies.append(client.get("/v1/tasks", headers=headers).text)
            for _ in range(6):  # rate limited on the last ones
                bodies.append(client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).text)

            async def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("store exploded")

            monkeypatch.setattr(state.store, "list", broken)  # an unexpected error: logged with its traceback
            failing = client.get("/v1/tasks", headers={"Authorization": f"Bearer {KEY}"})
            assert failing.status_code == 500
            bodies.append(failing.text)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for lg, level, propagate in old:
            lg.setLevel(level)
            lg.propagate = propagate
    text = "\n".join(records)
    assert "store exploded" in text, "the logs were captured"
    for secret in (KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in text
        assert not any(secret in b for b in bodies), "an error body echoes a key"
    print(f"FIGURE keys-in-logs: {len(records)} log records over {len(bodies)} requests, no key in any")


def test_rate_limit_identity(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(api_keys=f"{KEY},{OTHER_KEY}", rate_limit_per_minute=4)
    with serve(settings) as service, service.client() as client:
        for _ in range(10):  # unauthenticated noise does not spend a key's budget
            assert client.get("/v1/tasks").status_code == 401
            assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {WRONG_KEY}"}).status_code == 403
        auth = {"Authorization": f"Bearer {KEY}"}
        statuses = [  # one budget per key across routes
            client.get("/v1/tasks", headers=auth).status_code,
            client.get("/v1/models", headers=auth).status_code,
            client.post(
                "/v1/completions", headers=auth, json={"model": "tiny", "prompt": "x", "max_tokens": 1}
            ).status_code,
            client.get("/v1/tasks/nope", headers=auth).status_code,
            client.get("/v1/models", headers=auth).status_code,
        ]
        assert statuses == [200, 200, 200, 404, 429]
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200


def test_rate_limit_without_keys_is_per_address(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(rate_limit_per_minute=3)) as service, service.client() as client:
        assert [client.get("/v1/models").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_cors_configured_allows_only_listed_origins(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(cors_origins="https://app.example")) as service, service.client() as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = client.options("/v1/tasks", headers={"Origin": "https://app.example", **preflight})
        assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
        for origin in ("https://evil.example", "https://app.example.evil.example", "null"):
            refused = client.options("/v1/tasks", headers={"Origin": origin, **preflight})
            assert "access-control-allow-origin" not in refused.headers, origin
            simple = client.get("/v1/tasks", headers={"Origin": origin})
            assert "access-control-allow-origin" not in simple.headers, origin
        assert "access-control-allow-credentials" not in allowed.headers


HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "a/../../b",
    "x\x00y",
    "~root",
    "tasks.sqlite3",
    "%2e%2e%2fetc",
    ".hidden",
    "-rf",
    "a" * 129,
]


def test_path_like_ids_touch_no_files(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from urllib.parse import quote

    settings = settings_for()
    root_before = sorted(p.name for p in ROOT.iterdir())
    with serve(settings) as service, service.client() as client:
        before = {p for p in tmp_path.rglob("*")}
        refused = 0
        for hostile in HOSTILE_IDS:
            created = client.post("/v1/tasks", json={"task_id": hostile, "description": "x"})
            if hostile == "tasks.sqlite3":  # a plain valid id: stored as a row, never a file name
                assert created.status_code == 201
                continue
            assert created.status_code == 422, (hostile, created.text)
            refused += 1
            for path in (f"/v1/tasks/{quote(hostile, safe='')}", f"/v1/adapters/{quote(hostile, safe='')}",
                         f"/v1/adapters/{quote(hostile, safe='')}/weights"):  # fmt: skip
                for method in ("GET", "DELETE") if path.startswith("/v1/tasks") else ("GET",):
                    response = client.request(method, path)
                    assert response.status_code in {404, 422}, (method, path, response.status_code)
            assert client.get("/v1/tasks", params={"cursor": hostile[:128]}).status_code == 200
            for body in (
                {"model": hostile, "prompt": "x"},
                {"model": hostile, "messages": [{"role": "user", "content": "x"}]},
            ):
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                assert client.post(path, json=body).status_code == 404
        after = {p for p in tmp_path.rglob("*")}
    data_dir = settings.data_dir
    new = after - before
    assert all(p.is_relative_to(data_dir) for p in new), new
    assert {p.name for p in data_dir.iterdir()} <= {"tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm"}
    assert sorted(p.name for p in ROOT.iterdir()) == root_before
    with sqlite3.connect(data_dir / "tasks.sqlite3") as db:
        assert [r[0] for r in db.execute("SELECT task_id FROM tasks")] == ["tasks.sqlite3"]
    print(f"FIGURE path-ids: {refused} path-like ids refused with 422 on create, 404/422 on every lookup; "
          f"no file outside the data dir")  # fmt: skip
