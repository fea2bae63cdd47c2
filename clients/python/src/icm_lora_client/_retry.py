"""When to retry, and how long to wait: shared by the sync and async clients, which only differ in how they sleep.

Retried: connection errors, 429 and 503 — and only for idempotent requests (GET, DELETE, task registration and
adapter generation, which are idempotent by design). A completion is generated anew on every call, so it is retried
only when the connection failed before anything was sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

from ._errors import connection_error, parse_retry_after, status_error

RETRY_STATUSES = frozenset({429, 503})

# failures that happen before the request leaves the client: safe to retry whatever the request does
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _retryable(error: httpx.RequestError) -> bool:
    # a network failure may pass; a wrong URL scheme or an undecodable body will not
    return isinstance(error, httpx.TransportError) and not isinstance(error, httpx.UnsupportedProtocol)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter: before retry ``n`` (0-based) wait ``uniform(0, min(max_delay,
    initial_delay * 2**n))`` seconds, or exactly ``Retry-After`` when the service sent one. A ``Retry-After`` longer
    than ``max_retry_after`` is not waited for: the error is raised at once (its ``retry_after`` says how long)."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def backoff(self, attempt: int) -> float:
        return self.rng.uniform(0.0, min(self.max_delay, self.initial_delay * 2.0**attempt))


def delay_or_raise(
    policy: RetryPolicy,
    attempt: int,
    *,
    idempotent: bool,
    response: httpx.Response | None = None,
    error: httpx.RequestError | None = None,
) -> float:
    """Seconds to sleep before the next try, after try number ``attempt`` (0-based) failed with ``response`` (an
    error status, body read) or ``error``. Raises the client's exception for that failure when it is not retried."""
    if error is not None:
        if attempt < policy.max_retries and _retryable(error) and (idempotent or isinstance(error, _NOT_SENT)):
            return policy.backoff(attempt)
        raise connection_error(error) from error
    if response is None:
        raise TypeError("delay_or_raise needs a response or an error")
    if attempt < policy.max_retries and idempotent and response.status_code in RETRY_STATUSES:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            return policy.backoff(attempt)
        if retry_after <= policy.max_retry_after:
            return retry_after
    raise status_error(response)
