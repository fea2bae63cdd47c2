"""AdapterService: task specs in, cached or freshly generated adapters out. The one place that generates."""

from __future__ import annotations

import asyncio
import time

from generator.adapter import GeneratedAdapter
from generator.generate import AdapterGenerator
from generator.tasks import Example, TaskFormatError, TaskSpec
from service.cache import AdapterCache, Tier
from service.config import Settings
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.schemas import TaskSpecIn
from service.task_store import TaskStore


def spec_from_request(body: TaskSpecIn, settings: Settings) -> TaskSpec:
    """Validate limits and build the TaskSpec; every failure is a 4xx with a message."""
    if len(body.examples) > settings.max_examples:
        raise APIError(422, f"too many examples: {len(body.examples)} > {settings.max_examples}")
    fields = [body.description] + [s for e in body.examples for s in (e.input, e.output, *(e.choices or []))]
    longest = max((len(f) for f in fields), default=0)
    if longest > settings.max_text_chars:
        raise APIError(
            422, f"a description or example field has {longest} characters; the limit is {settings.max_text_chars}"
        )
    try:
        examples = tuple(Example(e.input, e.output, tuple(e.choices) if e.choices else None) for e in body.examples)
        return TaskSpec(description=body.description, examples=examples)
    except TaskFormatError as exc:
        raise APIError(422, str(exc)) from None


class AdapterService:
    def __init__(
        self,
        generator: AdapterGenerator | None,
        cache: AdapterCache,
        store: TaskStore,
        metrics: ServiceMetrics,
    ) -> None:
        self.generator = generator
        self.cache = cache
        self.store = store
        self.metrics = metrics
        self._generate_lock = asyncio.Lock()  # generation is CPU-bound: one at a time, off the event loop

    def _require_generator(self) -> AdapterGenerator:
        if self.generator is None:
            raise APIError(
                503,
                "no generator checkpoint is configured for this base model; set ICM_LORA_GENERATOR_PATH",
                "generator_unavailable",
            )
        return self.generator

    def adapter_id(self, spec: TaskSpec, seed: int | None) -> str:
        return self._require_generator().adapter_id(spec, seed)

    async def get_or_generate(self, spec: TaskSpec, seed: int | None) -> tuple[GeneratedAdapter, Tier]:
        generator = self._require_generator()
        adapter_id = generator.adapter_id(spec, seed)
        await self.store.put_adapter_spec(adapter_id, spec, seed)
        return await self.cache.get_or_create(adapter_id, lambda: self._generate(generator, spec, seed))

    async def by_id(self, adapter_id: str) -> tuple[GeneratedAdapter, Tier]:
        """From a cache tier, or regenerated from the stored spec; 404 for an id this service never made."""
        found = await self.cache.lookup(adapter_id)
        if found is not None:
            return found
        stored = await self.store.get_adapter_spec(adapter_id)
        if stored is None:
            raise APIError(404, f"unknown adapter {adapter_id!r}")
        generator = self._require_generator()
        spec, seed = stored
        if generator.adapter_id(spec, seed) != adapter_id:
            raise APIError(404, f"adapter {adapter_id!r} was made by another generator version")
        return await self.cache.get_or_create(adapter_id, lambda: self._generate(generator, spec, seed))

    async def _generate(self, generator: AdapterGenerator, spec: TaskSpec, seed: int | None) -> GeneratedAdapter:
        async with self._generate_lock:
            start = time.perf_counter()
            adapter = await asyncio.to_thread(generator.generate, spec, seed)
            timings = generator.last_timings
        self.metrics.generation_seconds.labels("encode").observe(timings.encode_s)
        self.metrics.generation_seconds.labels("decode").observe(timings.decode_s)
        self.metrics.generation_seconds.labels("total").observe(time.perf_counter() - start)
        return adapter
