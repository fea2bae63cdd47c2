"""The download cache: one build per (adapter, format), digests that outlive evicted bodies, and a new build for a
new adapter object under the same id (its bytes are not trusted to be the same)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

from service.downloads import DownloadCache
from service.metrics import ServiceMetrics
from tests.engine.conftest import make_adapter


def _builds(metrics: ServiceMetrics, fmt: str) -> float:
    return metrics.registry.get_sample_value("icm_lora_adapter_download_builds_total", {"format": fmt}) or 0.0


def test_digests_are_those_of_the_bodies_and_outlive_them() -> None:
    async def scenario() -> None:
        metrics = ServiceMetrics()
        cache = DownloadCache(metrics, max_entries=1)  # room for one body: the other format is evicted
        adapter = make_adapter(1)
        digests = await cache.digests(adapter)
        assert digests["zip"] == hashlib.sha256(adapter.to_peft_zip()).hexdigest()
        assert digests["safetensors"] == hashlib.sha256(adapter.to_safetensors_bytes()).hexdigest()
        assert (_builds(metrics, "zip"), _builds(metrics, "safetensors")) == (1, 1)
        assert await cache.digests(adapter) == digests  # remembered although the zip body was evicted
        assert (_builds(metrics, "zip"), _builds(metrics, "safetensors")) == (1, 1)
        assert (await cache.body(adapter, "safetensors")).sha256 == digests["safetensors"]  # the kept body: a hit
        assert _builds(metrics, "safetensors") == 1
        twin = dataclasses.replace(adapter, metadata={"self_check": "changed"})  # same id, other bytes
        assert (await cache.digests(twin))["safetensors"] != digests["safetensors"]
        cache.forget(adapter.adapter_id)
        assert cache.cached(twin, "safetensors") is None

    asyncio.run(scenario())
