"""Content negotiation (``Accept`` → 406) and conditional downloads (``If-None-Match`` → 304)."""

from __future__ import annotations

import mimeparse
from fastapi import Request

from service.errors import APIError

JSON = "application/json"
ZIP = "application/zip"
SAFETENSORS = "application/octet-stream"
EVENT_STREAM = "text/event-stream"
HTML = "text/html"


def negotiate(request: Request, offered: list[str]) -> str:
    """The media type among ``offered`` (most preferred first) that the request's ``Accept`` takes; no ``Accept``
    (or ``*/*``) takes the first. 406 when it takes none of them, 400 when the header cannot be parsed."""
    accept = request.headers.get("accept", "").strip() or "*/*"
    try:
        # best_match prefers the later of equally acceptable types: hand it the offer in reverse
        chosen: str = mimeparse.best_match(list(reversed(offered)), accept)
    except mimeparse.MimeTypeParseException as exc:
        raise APIError(400, f"malformed Accept header {accept[:200]!r}: {exc}") from None
    if not chosen:
        raise APIError(
            406,
            f"this route answers with {', '.join(offered)}; the Accept header {accept[:200]!r} takes none of them",
            "not_acceptable",
        )
    return chosen


class Accepts:
    """Route dependency: 406 unless the request accepts one of ``offered``."""

    def __init__(self, *offered: str) -> None:
        self.offered = list(offered)

    def __call__(self, request: Request) -> str:
        return negotiate(request, self.offered)


def not_modified(request: Request, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (a quoted strong tag) or is ``*``: the client's copy is current."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags
