"""AdapterService: task specs in, cached or freshly generated adapters out. The one place that generates."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

from generator.adapter import GeneratedAdapter
from generator.generate import AdapterGenerator
from generator.refine import RefinePlan, refined_adapter_id
from generator.selfcheck import SelfCheck, SelfCheckPolicy
from generator.tasks import Example, TaskFormatError, TaskSpec
from service.cache import AdapterCache, Tier
from service.config import Settings
from service.engine import EngineError
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.refine import RefineOrigin, Refiner
from service.schemas import TaskSpecIn
from service.selfcheck import AdapterChecker, with_check
from service.task_store import StoredSpec, TaskStore

log = logging.getLogger(__name__)
OUTCOMES = {"fallback": "fallback", "keep": "kept", "refine": "refined"}  # a failed check's metric outcome per policy


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


def _other_version(generator: AdapterGenerator, adapter_id: str, stored: StoredSpec) -> str | None:
    """Why ``stored`` cannot make ``adapter_id`` with this generator (made by another version), or None."""
    parent_id = generator.adapter_id(stored.spec, stored.seed)
    if stored.refine is not None:
        if stored.refine.parent_id != parent_id or refined_adapter_id(parent_id, stored.refine.plan) != adapter_id:
            return "was refined from another generator version's adapter"
        return None
    return "was made by another generator version" if parent_id != adapter_id else None


def refine_plan(settings: Settings, steps: int) -> RefinePlan:
    """The refinement of ``steps`` steps with this service's fixed settings."""
    return RefinePlan(steps=steps, learning_rate=settings.refine_learning_rate, batch_size=settings.refine_batch_size)


class AdapterService:
    """``checker``: the self-check run on every adapter it makes (None: none are checked). ``refiner``: trains refined
    adapters (None: refinement answers 503). ``policy``: what a failed check means (see ``service.selfcheck``)."""

    def __init__(
        self,
        generator: AdapterGenerator | None,
        cache: AdapterCache,
        store: TaskStore,
        metrics: ServiceMetrics,
        checker: AdapterChecker | None = None,
        refiner: Refiner | None = None,
        policy: SelfCheckPolicy = "fallback",
    ) -> None:
        self.generator = generator
        self.cache = cache
        self.store = store
        self.metrics = metrics
        self.checker = checker
        self.refiner = refiner
        self.policy: SelfCheckPolicy = policy
        self._generate_lock = asyncio.Lock()  # generation is CPU-bound: one at a time, off the event loop
        self._refine_lock = asyncio.Lock()  # training too, and longer: one refinement at a time
        self._stop = threading.Event()  # set on shutdown: a running refinement stops at its next step

    def close(self) -> None:
        self._stop.set()

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
        await self.store.put_adapter_spec(adapter_id, StoredSpec(spec, seed))
        self.metrics.spec_writes.inc()
        return await self.cache.get_or_create(adapter_id, lambda: self._generate(generator, spec, seed))

    async def for_task(self, spec: TaskSpec, seed: int | None) -> tuple[GeneratedAdapter, Tier]:
        """A registered task's adapter, for serving. Its spec was stored when the task was registered, so an adapter
        in the memory tier is served with no store write (the hot path of every completion); one the memory tier lacks
        (evicted, or deleted with ``DELETE /v1/adapters/{id}``) goes through ``get_or_generate``, which stores its spec
        again so that the id can be fetched by itself."""
        generator = self._require_generator()
        adapter_id = generator.adapter_id(spec, seed)
        if self.cache.in_memory(adapter_id):
            return await self.cache.get_or_create(adapter_id, lambda: self._generate(generator, spec, seed))
        return await self.get_or_generate(spec, seed)

    async def by_id(self, adapter_id: str) -> tuple[GeneratedAdapter, Tier]:
        """From a cache tier, or regenerated (refined again) from the stored spec; 404 for an id never made here."""
        found = await self.cache.lookup(adapter_id)
        if found is not None:
            return found
        stored = await self.store.get_adapter_spec(adapter_id)
        if stored is None:
            raise APIError(404, f"unknown adapter {adapter_id!r}")
        generator = self._require_generator()
        mismatch = _other_version(generator, adapter_id, stored)
        if mismatch:
            raise APIError(404, f"adapter {adapter_id!r} {mismatch}")
        if stored.refine is not None:
            parent, _ = await self.get_or_generate(stored.spec, stored.seed)
            return await self.refined(parent, stored.spec, stored.seed, stored.refine.plan)
        return await self.cache.get_or_create(adapter_id, lambda: self._generate(generator, stored.spec, stored.seed))

    async def known(self, adapter_ids: Sequence[str]) -> set[str]:
        """Those of ``adapter_ids`` that ``by_id`` serves, told without generating, training or reading weights: a
        cache tier holds it, or its stored spec is this generator version's (a spec's lifetime is renewed). One query
        for the specs and, for ids without one, one Redis pipeline, however many ids (the vLLM plugin re-checks
        every name it serves this way)."""
        ids = list(dict.fromkeys(adapter_ids))
        specs = await self.store.get_adapter_specs(ids)
        generator = self.generator
        by_spec = set()
        if generator is not None:
            by_spec = {i for i, stored in specs.items() if not _other_version(generator, i, stored)}
        return by_spec | await self.cache.held([i for i in ids if i not in by_spec])

    async def refined(
        self, parent: GeneratedAdapter, spec: TaskSpec, seed: int | None, plan: RefinePlan
    ) -> tuple[GeneratedAdapter, Tier]:
        """The refinement of ``parent`` by ``plan``: cached, or trained now (single-flight, one at a time)."""
        refiner = self.refiner
        if refiner is None:
            raise APIError(503, "adapter refinement is not available on this service", "refinement_unavailable")
        adapter_id = await self.plan_refinement(parent, spec, seed, plan)
        return await self.cache.get_or_create(adapter_id, lambda: self._refine(refiner, parent, spec, plan, adapter_id))

    async def plan_refinement(
        self, parent: GeneratedAdapter, spec: TaskSpec, seed: int | None, plan: RefinePlan
    ) -> str:
        """Store the durable spec of ``parent``'s refinement by ``plan`` (from then on its id can be fetched, trained
        on demand when no cache has it) and return that id."""
        if self.refiner is None:
            raise APIError(503, "adapter refinement is not available on this service", "refinement_unavailable")
        if not spec.examples:
            raise APIError(422, "refine_steps needs examples: a refinement trains on the task's examples")
        adapter_id = refined_adapter_id(parent.adapter_id, plan)
        await self.store.put_adapter_spec(adapter_id, StoredSpec(spec, seed, RefineOrigin(parent.adapter_id, plan)))
        self.metrics.spec_writes.inc()
        return adapter_id

    async def _generate(self, generator: AdapterGenerator, spec: TaskSpec, seed: int | None) -> GeneratedAdapter:
        async with self._generate_lock:
            start = time.perf_counter()
            adapter = await asyncio.to_thread(generator.generate, spec, seed)
            timings = generator.last_timings
            check, adapter = await self._checked(spec, adapter)
        self.metrics.generation_seconds.labels("encode").observe(timings.encode_s)
        self.metrics.generation_seconds.labels("decode").observe(timings.decode_s)
        self.metrics.generation_seconds.labels("total").observe(time.perf_counter() - start)
        if self.checker is not None:
            outcome = "unchecked" if check is None else "passed" if check.passed else OUTCOMES[self.policy]
            self.metrics.self_checks.labels(outcome).inc()
        return adapter

    async def _refine(
        self, refiner: Refiner, parent: GeneratedAdapter, spec: TaskSpec, plan: RefinePlan, adapter_id: str
    ) -> GeneratedAdapter:
        async with self._refine_lock:
            adapter = await asyncio.to_thread(refiner, spec, parent, plan, adapter_id, self._stop)
        if adapter.adapter_id != adapter_id:
            raise RuntimeError(f"the refiner returned adapter {adapter.adapter_id!r}, expected {adapter_id!r}")
        async with self._generate_lock:
            _, adapter = await self._checked(spec, adapter)
        return adapter

    async def _checked(self, spec: TaskSpec, adapter: GeneratedAdapter) -> tuple[SelfCheck | None, GeneratedAdapter]:
        """Run the self-check (in a worker thread: it scores through the engine) and store it in the metadata."""
        if self.checker is None or not spec.examples:
            return None, adapter
        try:
            check = await asyncio.to_thread(self.checker, spec, adapter)
        except EngineError as exc:  # closed, or every slot pinned for too long: try again later, never unchecked
            raise APIError(
                503, f"the adapter's self-check could not run: {exc}", headers={"Retry-After": "1"}
            ) from None
        if check is None:
            return None, adapter
        return check, with_check(adapter, check)
