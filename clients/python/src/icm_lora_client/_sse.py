"""Server-sent events to typed chunks, without I/O: the sync and async streams feed it lines.

The service sends ``data: {json}`` events separated by blank lines and ends with ``data: [DONE]``. A failure after
the 200 status line arrives as a last chunk with ``finish_reason: "error"`` (or, from other OpenAI-compatible
servers, an ``{"error": {...}}`` event); both raise :class:`APIStreamError`, as does a stream that ends without
``[DONE]`` (the output would be silently truncated otherwise).
"""

from __future__ import annotations

import json
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ._errors import APIStreamError

DONE = "[DONE]"

ChunkT = TypeVar("ChunkT", bound=BaseModel)


class SSEDecoder:
    """Lines in, event data out (the ``data`` fields of one event joined by newlines, per the SSE spec)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The data of the event that ``line`` completes, else ``None``."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):  # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None  # event:, id:, retry: carry nothing the client needs

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class ChunkParser(Generic[ChunkT]):
    """Turns SSE lines into ``ChunkT`` models until ``[DONE]``."""

    def __init__(self, chunk_type: type[ChunkT], request_id: str | None = None) -> None:
        self._type = chunk_type
        self._decoder = SSEDecoder()
        self._request_id = request_id
        self.done = False

    def feed(self, line: str) -> ChunkT | None:
        if self.done:
            return None
        data = self._decoder.feed(line)
        return None if data is None else self._parse(data)

    def finish(self) -> None:
        """Call at the end of the body: raises if ``[DONE]`` never came. A last event without its blank line is
        dropped, as the SSE spec says."""
        if not self.done:
            raise APIStreamError("the stream ended before [DONE]", request_id=self._request_id)

    def _parse(self, data: str) -> ChunkT | None:
        if data.strip() == DONE:
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise APIStreamError(
                f"malformed event in the stream: {data[:200]!r}", request_id=self._request_id
            ) from None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            error = payload["error"]
            raise APIStreamError(
                str(error.get("message") or "the service failed during the stream"),
                error_type=error.get("type"),
                request_id=self._request_id,
            )
        try:
            chunk = self._type.model_validate(payload)
        except ValidationError as exc:
            raise APIStreamError(f"unexpected event in the stream: {exc}", request_id=self._request_id) from None
        if getattr(chunk, "finish_reason", None) == "error":
            raise APIStreamError(
                "the service failed during the stream (finish_reason 'error')",
                error_type="stream_error",
                request_id=self._request_id or getattr(chunk, "id", None),
            )
        return chunk
