"""Download bodies built once per adapter: the PEFT zip and the bare safetensors file, with their SHA-256.

Serialising an adapter (and deflating its zip) costs milliseconds of CPU; a download used to pay it on the event loop
every time, and again to compute its ETag. Here each (adapter, format) is built once, in a worker thread, and kept in a
small LRU. An entry is tied to the adapter object it was built from (a weak reference): the metadata (a self-check
result) is part of the bytes, so an adapter regenerated or re-read from Redis under the same id is built again rather
than trusted to be byte-identical.

The digests outlive the bodies: the adapter metadata (``sha256.zip`` / ``sha256.safetensors``, the ETags) asks
``digests()``, which builds the bodies it does not know yet (so the download that usually follows is a hit) and keeps
the two digests per adapter object in a much larger table than the bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, TypeVar

from generator.adapter import GeneratedAdapter
from service.metrics import ServiceMetrics

Format = Literal["zip", "safetensors"]
FORMATS: tuple[Format, ...] = ("zip", "safetensors")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Body:
    content: bytes
    sha256: str


class DownloadCache:
    def __init__(self, metrics: ServiceMetrics, max_entries: int = 64, max_digests: int = 4096) -> None:
        self.metrics = metrics
        self.max_entries = max_entries
        self.max_digests = max_digests
        self._entries: OrderedDict[tuple[str, Format], tuple[weakref.ref[GeneratedAdapter], Body]] = OrderedDict()
        self._digests: OrderedDict[tuple[str, Format], tuple[weakref.ref[GeneratedAdapter], str]] = OrderedDict()
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
            _remember(self._entries, key, (weakref.ref(adapter), body), self.max_entries)
            _remember(self._digests, key, (weakref.ref(adapter), body.sha256), self.max_digests)
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._building[key]

    async def digests(self, adapter: GeneratedAdapter) -> dict[Format, str]:
        """SHA-256 of each download format's bytes: remembered per adapter object, else built with the body."""
        found: dict[Format, str] = {}
        for fmt in FORMATS:
            entry = self._digests.get((adapter.adapter_id, fmt))
            if entry is not None and entry[0]() is adapter:
                self._digests.move_to_end((adapter.adapter_id, fmt))
                found[fmt] = entry[1]
            else:
                found[fmt] = (await self.body(adapter, fmt)).sha256
        return found

    def forget(self, adapter_id: str) -> None:
        for fmt in FORMATS:
            self._entries.pop((adapter_id, fmt), None)
            self._digests.pop((adapter_id, fmt), None)


def _remember(table: OrderedDict[tuple[str, Format], _V], key: tuple[str, Format], value: _V, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _build(adapter: GeneratedAdapter, fmt: Format) -> Body:
    content = adapter.to_peft_zip() if fmt == "zip" else adapter.to_safetensors_bytes()
    return Body(content, hashlib.sha256(content).hexdigest())
