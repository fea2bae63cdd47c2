from __future__ import annotations

import asyncio

import pytest
import redis

from service.api.security import SlidingWindowLimiter
from tests.service.conftest import REDIS_URL, free_port, metric_value, serve


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


def test_rate_limit_is_shared_through_redis(redis_prefix: str) -> None:
    """Two limiters on one Redis (two replicas) spend one budget per identity; counters expire with the window."""

    async def run() -> None:
        first = SlidingWindowLimiter(3, REDIS_URL, redis_prefix)
        second = SlidingWindowLimiter(3, REDIS_URL, redis_prefix)
        states = [await limiter.hit("key:a") for limiter in (first, second, first)]
        assert [s.allowed for s in states] == [True, True, True]
        assert [s.remaining for s in states] == [2, 1, 0]  # one budget, counted by both
        refused = await second.hit("key:a")
        assert not refused.allowed and not (await first.hit("key:a")).allowed  # not 2 x 3
        assert 0 < refused.retry_after_s <= 60 and refused.headers()["X-RateLimit-Remaining"] == "0"
        assert (await second.hit("key:b")).allowed  # per identity
        keys = [k.decode() for k in redis.Redis.from_url(REDIS_URL).scan_iter(f"{redis_prefix}:ratelimit*")]
        assert keys and all(redis.Redis.from_url(REDIS_URL).ttl(k) > 0 for k in keys), keys  # bounded: they expire

    asyncio.run(run())


def test_rate_limit_lets_requests_through_when_its_redis_is_down() -> None:
    async def run() -> None:
        limiter = SlidingWindowLimiter(1, f"redis://127.0.0.1:{free_port()}/0", "down")
        assert [(await limiter.hit("key:a")).allowed for _ in range(3)] == [True, True, True]

    asyncio.run(run())


def test_rate_limit_in_memory_without_redis() -> None:
    async def run() -> None:
        limiter = SlidingWindowLimiter(2)
        states = [await limiter.hit("addr:x") for _ in range(3)]
        assert [s.allowed for s in states] == [True, True, False] and states[0].limit == 2
        assert 0 < states[2].retry_after_s <= 60 and states[2].headers()["Retry-After"] != "0"

    asyncio.run(run())


def test_forwarded_addresses_only_from_trusted_proxies(settings_for) -> None:  # type: ignore[no-untyped-def]
    """Without keys the limit is per client address; X-Forwarded-For changes that address only when the connection
    comes from a configured proxy (uvicorn alone would trust it from 127.0.0.1)."""

    def statuses(client, addresses: list[str]) -> list[int]:  # type: ignore[no-untyped-def]
        return [client.get("/v1/models", headers={"X-Forwarded-For": a}).status_code for a in addresses]

    spoofed = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    with serve(settings_for(rate_limit_per_minute=2)) as service, service.client() as client:
        assert statuses(client, spoofed) == [200, 200, 429]  # one budget: the header is ignored
    with serve(settings_for(rate_limit_per_minute=2, trusted_proxies="127.0.0.0/8")) as service, service.client() as c:
        assert statuses(c, spoofed) == [200, 200, 200]  # three clients behind the proxy
        assert statuses(c, ["10.0.0.1"]) == [200] and statuses(c, ["10.0.0.1"]) == [429]


def test_trusted_proxies_must_be_addresses(settings_for) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not an IP address"):
        settings_for(trusted_proxies="10.0.0.0/8,proxy.example")


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
