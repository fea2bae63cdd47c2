"""GET /: the playground, one static page (no build step, no external assets) that drives the public API."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from service.api.negotiation import HTML, Accepts

router = APIRouter(tags=["playground"])
PAGE = Path(__file__).resolve().parents[2] / "static" / "playground.html"

# the page talks to this service only; its script and style are inline
POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@functools.cache
def _page() -> bytes:
    return PAGE.read_bytes()


@router.get(
    "/",
    response_class=HTMLResponse,
    summary="Playground: describe a task, give examples, see the adapter and its self-check, chat with it",
    dependencies=[Depends(Accepts(HTML))],
)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff"})
