"""What a rate limiter tells a client: the ``X-RateLimit-*`` headers, from the limiter's state after a request.

The seam between any limiter and the HTTP layer: a limiter answers ``hit(identity) -> RateLimitState``; the ``Guard``
(``service.api.security``) keeps that state on the request, and ``RateLimitHeaders`` (``service.api.middleware``)
writes these headers on every response of a rate-limited route, 429s included. The limiter in use is
``service.api.security.SlidingWindowLimiter`` (the ``limits`` library, shared through Redis when configured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

STATE_KEY = "rate_limit"  # the Guard sets request.state.rate_limit, which is scope["state"]["rate_limit"]


@dataclass(frozen=True)
class RateLimitState:
    """``limit``: requests allowed per window (the burst); ``remaining``: requests left now; ``reset_s``: seconds
    until ``remaining`` is back at ``limit``; ``retry_after_s``: when refused, seconds until one request is allowed."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float = 0.0

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(max(0, math.ceil(self.reset_s))),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class RateLimiter(Protocol):
    async def hit(self, identity: str) -> RateLimitState:
        """Count one request of ``identity`` (when allowed) and return the state after it."""
        ...
