"""Adapters fetched from an icm-lora service into a bounded local folder, verified; no vLLM, no torch.

``AdapterStore.fetch(name)`` resolves a task id (or an adapter id) through the service (``POST /v1/resolve``),
downloads the adapter's PEFT zip, checks the weights against the checksum the service serves (``tensors_sha256`` of
the adapter's metadata, the same digest the safetensors header carries), and moves the folder into place in one
rename, so a reader (vLLM's loader) never sees half an adapter. At most ``max_adapters`` folders are kept; the least
recently used go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from icm_lora_client import AdapterMetadata, AsyncClient

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# safetensors dtype -> the name torch prints, which the service's checksum covers (generator.adapter.tensors_sha256)
_TORCH_DTYPES = {"F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16", "F64": "torch.float64"}


class ChecksumMismatch(ValueError):
    """The downloaded weights do not match the checksum the service serves."""


@dataclass(frozen=True)
class Resolved:
    """``name``: what vLLM asked for; ``task_id``: None when ``name`` is an adapter id; ``path``: the PEFT folder."""

    name: str
    task_id: str | None
    adapter_id: str
    path: Path

    @property
    def int_id(self) -> int:
        """A stable positive 31-bit id for the adapter (vLLM's ``lora_int_id``; vLLM may renumber it)."""
        return zlib.crc32(self.adapter_id.encode()) % (2**31 - 1) + 1


def tensors_sha256(data: bytes) -> str:
    """The service's tensor checksum of safetensors ``data``: over keys, dtypes, shapes and raw bytes, in key
    order, without torch."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    digest = hashlib.sha256()
    for key in sorted(k for k in header if k != "__metadata__"):
        entry = header[key]
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ChecksumMismatch(f"unsupported dtype {entry['dtype']} for {key}")
        start, end = entry["data_offsets"]
        digest.update(f"{key}|{dtype}|{tuple(entry['shape'])}|".encode())
        digest.update(body[start:end])
    return digest.hexdigest()


class AdapterStore:
    def __init__(self, client: AsyncClient, folder: Path, max_adapters: int = 64) -> None:
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        self.client = client
        self.folder = folder
        self.max_adapters = max_adapters
        folder.mkdir(parents=True, exist_ok=True)

    async def lookup_many(self, names: Sequence[str]) -> dict[str, tuple[str | None, str] | None]:
        """Per name: (task id or None, adapter id) for a task id or an adapter id the service knows; None when it
        knows neither. One ``POST /v1/resolve`` per 256 names; connection errors propagate (after the client's
        retries)."""
        return {r.name: (r.task_id, r.adapter_id) if r.adapter_id else None for r in await self.client.resolve(names)}

    async def lookup(self, name: str) -> tuple[str | None, str] | None:
        return (await self.lookup_many([name]))[name]

    async def fetch(self, name: str) -> Resolved | None:
        found = await self.lookup(name)
        if found is None:
            return None
        task_id, adapter_id = found
        path = self.folder / adapter_id
        if not (path / WEIGHTS).is_file():
            metadata = await self.client.get_adapter(adapter_id)
            await self._download(metadata, path)
        os.utime(path)  # recently used
        self._evict(keep=path)
        return Resolved(name, task_id, adapter_id, path)

    async def _download(self, metadata: AdapterMetadata, path: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=self.folder))
        try:
            await self.client.download_adapter(metadata.adapter_id, tmp)
            actual = tensors_sha256((tmp / WEIGHTS).read_bytes())
            if actual != metadata.tensors_sha256:
                raise ChecksumMismatch(
                    f"adapter {metadata.adapter_id}: weights checksum {actual} is not the served "
                    f"{metadata.tensors_sha256}"
                )
            try:
                tmp.rename(path)
            except OSError:  # another process put it there first: same content address, keep theirs
                if not (path / WEIGHTS).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _evict(self, keep: Path) -> list[str]:
        folders = [p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        evicted = []
        for old in folders[self.max_adapters :]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                evicted.append(old.name)
        return evicted

    def drop(self, adapter_id: str) -> None:
        shutil.rmtree(self.folder / adapter_id, ignore_errors=True)

    def held(self) -> set[str]:
        return {p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
