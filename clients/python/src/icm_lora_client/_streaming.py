"""``Stream`` and ``AsyncStream``: iterate typed chunks of an open streamed response, and close it when done.

Breaking out of the loop early and closing the stream (or leaving its ``with`` block) closes the connection, which
cancels the generation in the service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Generic

import httpx

from ._errors import connection_error, request_id_of
from ._sse import ChunkParser, ChunkT


class Stream(Generic[ChunkT]):
    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]) -> None:
        self.response = response
        self._parser = ChunkParser(chunk_type, request_id_of(response))

    def __iter__(self) -> Iterator[ChunkT]:
        try:
            for line in self.response.iter_lines():
                if (chunk := self._parser.feed(line)) is not None:
                    yield chunk
                if self._parser.done:
                    break
            else:
                self._parser.finish()
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[ChunkT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream(Generic[ChunkT]):
    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]) -> None:
        self.response = response
        self._parser = ChunkParser(chunk_type, request_id_of(response))

    async def __aiter__(self) -> AsyncIterator[ChunkT]:
        try:
            async for line in self.response.aiter_lines():
                if (chunk := self._parser.feed(line)) is not None:
                    yield chunk
                if self._parser.done:
                    break
            else:
                self._parser.finish()
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.close()

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[ChunkT]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
