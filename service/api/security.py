"""API keys (Bearer, compared in constant time) and a per-key token-bucket rate limit."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from service.api.rate_limit import RateLimiter, RateLimitState
from service.errors import APIError


@dataclass
class TokenBucketLimiter:
    """``per_minute`` requests per identity, refilled continuously; bursts up to ``per_minute``."""

    per_minute: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # identity -> (tokens, last refill)

    def hit(self, identity: str) -> RateLimitState:
        now = time.monotonic()
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(identity, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[identity] = (tokens, now)
        return RateLimitState(
            allowed=allowed,
            limit=self.per_minute,
            remaining=int(tokens),
            reset_s=(self.per_minute - tokens) / rate,
            retry_after_s=0.0 if allowed else (1.0 - tokens) / rate,
        )


class Guard:
    """The dependency every /v1 route takes: authentication, then rate limiting."""

    def __init__(self, api_keys: list[str], rate_limit_per_minute: int) -> None:
        # keys are kept as digests: comparing fixed-length digests in constant time leaks neither key nor length
        self._digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self._limiter: RateLimiter | None = (
            TokenBucketLimiter(rate_limit_per_minute) if rate_limit_per_minute > 0 else None
        )

    def identity(self, request: Request) -> str:
        if not self._digests:
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
            limit = self._limiter.hit(identity)
            request.state.rate_limit = limit  # scope["state"][STATE_KEY]: RateLimitHeaders puts it on the response
            if not limit.allowed:
                raise APIError(429, "rate limit exceeded", headers=limit.headers())
        return identity
