"""Download bodies built once per adapter: the PEFT zip and the bare safetensors file, with their SHA-256.

Serialising an adapter (and deflating its zip) costs milliseconds of CPU; a download used to pay it on the event loop
every time, and again to compute its ETag. Here each (adapter, format) is built once, in a worker thread, and kept in a
small LRU. An entry is tied to the adapter object it was built from (a weak reference): the metadata (a self-check
result) is part of the bytes, so an adapter regenerated or re-read from Redis under the same id is built again rather
than trusted to be byte-identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from generator.adapter import GeneratedAdapter
from service.metrics import ServiceMetrics

Format = Literal["zip", "safetensors"]


@dataclass(frozen=True)
class Body:
    content: bytes
    sha256: str


class DownloadCache:
    def __init__(self, metrics: ServiceMetrics, max_entries: int = 64) -> None:
        self.metrics = metrics
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, Format], tuple[weakref.ref[GeneratedAdapter], Body]] = OrderedDict()
        self._building: dict[tuple[str, Format], asyncio.Future[Body]] = {}

    def cached(self, adapter: GeneratedAdapter, fmt: Format) -> Body | None:
        key = (adapter.adapter_id, fmt)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not adapter:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def body(self, adapter: GeneratedAdapter, fmt: Format) -> Body:
        """The bytes of ``adapter`` in ``fmt`` and their SHA-256: built once (in a worker thread, one build however
        many requests ask at once), then served from memory."""
        found = self.cached(adapter, fmt)
        if found is not None:
            return found
        key = (adapter.adapter_id, fmt)
        pending = self._building.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Body] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            body = await asyncio.to_thread(_build, adapter, fmt)
            self.metrics.download_builds.labels(fmt).inc()
            self._entries[key] = (weakref.ref(adapter), body)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._building[key]

    def forget(self, adapter_id: str) -> None:
        for fmt in ("zip", "safetensors"):
            self._entries.pop((adapter_id, fmt), None)


def _build(adapter: GeneratedAdapter, fmt: Format) -> Body:
    content = adapter.to_peft_zip() if fmt == "zip" else adapter.to_safetensors_bytes()
    return Body(content, hashlib.sha256(content).hexdigest())
