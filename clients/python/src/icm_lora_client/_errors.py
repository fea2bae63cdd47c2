"""The exception tree, and the mapping from an HTTP response or a transport failure to it.

```
ICMLoraError
├── APIConnectionError          the request did not get an answer (refused, reset, DNS, ...)
│   └── APITimeoutError
├── APIStreamError              a stream that started with 200 failed before [DONE]
├── ResponseValidationError     a 2xx body of an unexpected shape
├── UnsafeArchiveError          a downloaded adapter zip with unsafe paths, links or missing files
└── APIStatusError              the service answered 4xx/5xx; status_code, type, message, request_id
    ├── BadRequestError         400, 422
    ├── AuthenticationError     401
    ├── PermissionDeniedError   403
    ├── NotFoundError           404
    ├── ConflictError           409
    ├── PayloadTooLargeError    413
    ├── RateLimitError          429
    └── InternalServerError     5xx
        └── ServiceUnavailableError 503
```
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

REQUEST_ID_HEADERS = ("x-request-id", "request-id")


class ICMLoraError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class APIConnectionError(ICMLoraError):
    """No answer from the service: connection refused or reset, DNS failure, protocol error."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read, write or pool timeout)."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIStreamError(ICMLoraError):
    """A streamed completion failed after its 200 status line was sent (the engine failed or shut down)."""

    def __init__(self, message: str, *, error_type: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.type = error_type


class UnsafeArchiveError(ICMLoraError):
    """A downloaded adapter zip is not a plain PEFT folder (unsafe paths, links, too large, files missing)."""


class ResponseValidationError(ICMLoraError):
    """A 2xx response whose body does not have the expected shape (another server, or an incompatible version)."""


class APIStatusError(ICMLoraError):
    """The service answered with an error status. ``type`` and ``message`` come from its error body,
    ``{"error": {"type": ..., "message": ...}}``; ``body`` is the parsed JSON (``None`` when it was not JSON)."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        error_type: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, request_id=request_id_of(response))
        self.response = response
        self.status_code = response.status_code
        self.type = error_type
        self.body = body

    @property
    def retry_after(self) -> float | None:
        """The ``Retry-After`` header in seconds, if the service sent one (429 and 503 do)."""
        return parse_retry_after(self.response.headers.get("retry-after"))

    def __str__(self) -> str:
        request = f", request id {self.request_id}" if self.request_id else ""
        return f"{self.status_code} {self.type or 'error'}: {self.message}{request}"


class BadRequestError(APIStatusError):
    """400 or 422: the request is invalid (the message says which field)."""


class AuthenticationError(APIStatusError):
    """401: no API key was sent."""


class PermissionDeniedError(APIStatusError):
    """403: the API key is not valid."""


class NotFoundError(APIStatusError):
    """404: unknown task, adapter or route."""


class ConflictError(APIStatusError):
    """409: the task id is registered with another spec."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is over the service's limit."""


class RateLimitError(APIStatusError):
    """429: rate limited, or the engine's queue is full."""


class InternalServerError(APIStatusError):
    """5xx."""


class ServiceUnavailableError(InternalServerError):
    """503: the service cannot answer now (no generator, store down, shutting down)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status_code: int) -> type[APIStatusError]:
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    return InternalServerError if status_code >= 500 else APIStatusError


def request_id_of(response: httpx.Response) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value: str | None = response.headers.get(name)
        if value:
            return value
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; an HTTP date or garbage gives ``None``."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for an error response whose body has been read. Tolerates any body: a proxy's HTML page, empty,
    or JSON of another shape all still give the right class, with the reason phrase or raw text as message."""
    body: Any = None
    error_type: str | None = None
    message: str | None = None
    with contextlib.suppress(ValueError):
        body = response.json()
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            error_type, message = _text(error, "type"), _text(error, "message")
        else:
            message = _text(body, "detail")  # FastAPI's default shape, e.g. from a proxy in front of the service
    if message is None and body is None:
        message = response.text.strip()[:500]
    message = message or response.reason_phrase or f"HTTP {response.status_code}"
    cls = error_class(response.status_code)
    return cls(message, response=response, error_type=error_type, body=body)


def _text(mapping: dict[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) else None


def connection_error(exc: httpx.RequestError) -> APIConnectionError:
    request = _request_of(exc)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc}" if str(exc) else "request timed out", request=request)
    return APIConnectionError(f"connection error: {exc}" if str(exc) else "connection error", request=request)


def _request_of(exc: httpx.RequestError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # httpx raises when the exception was made without a request
        return None
