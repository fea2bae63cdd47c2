"""API keys (Bearer, compared in constant time) and the per-identity rate limit.

The rate limit is the ``limits`` library's sliding-window counter: two counters per identity (bounded memory, keys
expire after two windows). With ``ICM_LORA_REDIS_URL`` set the counters live in Redis, so every replica on that
Redis spends from one budget per identity (not N budgets); without it, in process memory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from fastapi import Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from service.api.rate_limit import RateLimiter, RateLimitState
from service.errors import APIError

log = logging.getLogger(__name__)


class SlidingWindowLimiter:
    """``per_minute`` requests per identity in any sliding minute; shared through Redis when ``redis_url`` is set.
    When the shared store cannot be reached, requests are let through (logged): an outage of the limiter's store
    must not take the API down with it."""

    def __init__(self, per_minute: int, redis_url: str | None = None, prefix: str = "icm-lora") -> None:
        self.item = RateLimitItemPerMinute(per_minute)
        storage: Storage
        if redis_url:
            url = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            storage = RedisStorage(
                url,
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix=f"{prefix}:ratelimit",
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
            )
        else:
            storage = MemoryStorage()
        self.storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._warned_at = -math.inf

    async def hit(self, identity: str) -> RateLimitState:
        """Count one request of ``identity`` (when allowed); the state after it (``RateLimitState``)."""
        limit = self.item.amount
        try:
            allowed = await self._limiter.hit(self.item, identity)
            stats = await self._limiter.get_window_stats(self.item, identity)
        except StorageError as exc:
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("rate limit store unavailable, letting requests through: %s", exc.storage_error)
            return RateLimitState(allowed=True, limit=limit, remaining=limit, reset_s=0.0)
        wait = max(stats.reset_time - time.time(), 1e-3)
        return RateLimitState(
            allowed=allowed,
            limit=limit,
            remaining=stats.remaining,
            reset_s=wait,
            retry_after_s=0.0 if allowed else wait,
        )


class Guard:
    """The dependency every /v1 route takes: authentication, then rate limiting. ``limiter``: None for no limit."""

    def __init__(self, api_keys: list[str], limiter: RateLimiter | None = None) -> None:
        # keys are kept as digests: comparing fixed-length digests in constant time leaks neither key nor length
        self._digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self._limiter = limiter

    def identity(self, request: Request) -> str:
        if not self._digests:
            # the connection's address; behind a proxy listed in ICM_LORA_TRUSTED_PROXIES the server has already
            # replaced it by the forwarded client address (uvicorn's proxy headers), from anyone else it is kept
            return f"addr:{request.client.host if request.client else 'unknown'}"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise APIError(403, "invalid API key")
        return f"key:{digest.hex()[:16]}"

    async def __call__(self, request: Request) -> str:
        identity = self.identity(request)
        if self._limiter is not None:
            limit = await self._limiter.hit(identity)
            request.state.rate_limit = limit  # scope["state"][STATE_KEY]: RateLimitHeaders puts it on the response
            if not limit.allowed:
                raise APIError(429, "rate limit exceeded", headers=limit.headers())
        return identity
