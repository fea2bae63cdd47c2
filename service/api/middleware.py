"""Pure ASGI middleware (streaming-safe): body size limit, request metrics by route template, request ids."""

from __future__ import annotations

import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.rate_limit import STATE_KEY, RateLimitState
from service.errors import error_body
from service.metrics import ServiceMetrics


class BodySizeLimit:
    """413 for a declared or actual body larger than ``max_bytes``, before any route reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        received = 0
        too_large = started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # A body without Content-Length (chunked) goes over the limit while the route reads it; the framework
            # may catch _TooLarge itself and answer 400 ("error parsing the body"): answer 413 instead.
            nonlocal started
            if too_large:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_json(send, 413, f"request body larger than {self.max_bytes} bytes")
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, f"request body larger than {self.max_bytes} bytes")


class _TooLarge(Exception):
    pass


async def _send_json(send: Send, status: int, message: str) -> None:
    import json

    body = json.dumps(error_body("request_too_large", message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts requests by route template (``/v1/tasks/{task_id}``, never the raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestId:
    """Every response carries ``X-Request-Id``: the caller's own (when it is a short token) or a new one, so a
    client's error report can be matched with the service's logs."""

    HEADER = b"x-request-id"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers", [])).get(self.HEADER, b"")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex.encode()

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != self.HEADER]
                message = {**message, "headers": [*headers, (self.HEADER, request_id)]}
            await send(message)

        await self.app(scope, receive, tagging_send)


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RateLimitHeaders:
    """``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` on every response of a rate-limited route (429s too), from
    the ``RateLimitState`` the ``Guard`` left in the request's state (``service.api.rate_limit``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def limited_send(message: Message) -> None:
            limit = scope.get("state", {}).get(STATE_KEY)
            if message["type"] == "http.response.start" and isinstance(limit, RateLimitState):
                names = {name.lower().encode() for name in limit.headers()}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                extra = [(k.lower().encode(), v.encode()) for k, v in limit.headers().items()]
                message = {**message, "headers": [*headers, *extra]}
            await send(message)

        await self.app(scope, receive, limited_send)
