"""create_app(settings) and its lifespan: load the base model, the generator and the stores, then serve."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis
from transformers.utils import logging as transformers_logging

from generator.base_model import BaseModel, load_base_model
from generator.checkpoint import GeneratorCheckpoint, load_checkpoint
from generator.config import LoraSettings
from generator.device import Placement, dtype_name
from generator.generate import AdapterGenerator
from generator.task_encoder import MiniLMEmbedder, TaskEncoder
from service.adapters import AdapterService
from service.api.arrivals import Arrivals
from service.api.middleware import BodySizeLimit, RateLimitHeaders, RequestId, RequestMetrics
from service.api.routes import adapters, health, openai, playground, resolve, tasks
from service.api.security import Guard, SlidingWindowLimiter
from service.cache import AdapterCache, Invalidations, RedisTier
from service.config import Settings, get_settings
from service.downloads import DownloadCache
from service.engine import Engine
from service.errors import install_error_handlers
from service.inference import start_engine
from service.metrics import ServiceMetrics
from service.refine import Refiner, TrainingRefiner
from service.refinements import RefinementQueue
from service.selfcheck import AdapterChecker
from service.state import ServiceState, Startup
from service.task_store import RedisTaskStore, SqliteTaskStore, TaskStore

log = logging.getLogger(__name__)
# torch's thread count as the process started (an earlier app in this process may have set 1 since)
TORCH_THREADS = torch.get_num_threads()


def create_app(settings: Settings | None = None, refiner: Refiner | None = None) -> FastAPI:
    """``refiner``: what trains refined adapters; default a ``TrainingRefiner`` on a private copy of the base model.

    The port opens at once: the model and generator load in the background (``Startup``), and until they are ready
    ``/readyz`` answers 503 ``loading`` and every ``/v1`` route 503 with ``Retry-After``. The device and dtype are
    resolved first: ``PlacementError`` (a ``ValueError``) says why they cannot be used."""
    settings = settings or get_settings()
    placement = settings.placement()
    metrics = ServiceMetrics(redis_configured=bool(settings.redis_url))
    startup = Startup()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.engine_threads != 0:  # the engine thread alone has an OpenMP team
            _one_thread()  # the event loop's thread
            asyncio.get_running_loop().set_default_executor(one_thread_executor())
        loading = asyncio.create_task(_load(app, startup, settings, placement, metrics, refiner))
        try:
            yield
        finally:
            if not loading.done():  # stopped while loading: the worker thread finishes on its own, unused
                loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if startup.state is not None:
                await _close_state(startup.state)

    app = FastAPI(
        title="icm-lora",
        version="0.1.0",
        summary="LoRA adapters generated on demand from a task description and examples, and served.",
        lifespan=lifespan,
    )
    app.state.startup = startup
    app.state.metrics = metrics
    install_error_handlers(app)
    limiter = (
        SlidingWindowLimiter(settings.rate_limit_per_minute, settings.redis_url, settings.redis_prefix)
        if settings.rate_limit_per_minute > 0
        else None
    )
    guard = Guard([k.get_secret_value() for k in settings.api_keys], limiter)
    v1 = [Depends(guard)]
    app.include_router(adapters.router, dependencies=v1)
    app.include_router(tasks.router, dependencies=v1)
    app.include_router(resolve.router, dependencies=v1)
    app.include_router(openai.router, dependencies=v1)
    app.include_router(health.router)
    app.include_router(playground.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(Arrivals, startup=startup)  # from before the route reads the body and checks key and rate
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestId)  # outermost: even a 413 from BodySizeLimit carries the id
    return app


def _one_thread() -> None:
    torch.set_num_threads(1)


def one_thread_executor(max_workers: int | None = None) -> ThreadPoolExecutor:
    """Worker threads that run torch on one intra-op thread from their first op on (the service's ``to_thread`` pool:
    adapter generation, checks, preparation, downloads).

    A new thread's OpenMP default is the machine's cores, and torch narrows it only when the thread first runs one of
    its own parallel loops: a thread whose first op is a GEMM (``F.linear``) starts an OpenMP team of its own. Once a
    process has more OpenMP threads than cores, GNU OpenMP stops spinning for every team, the engine's included: on a
    2-core VM (2026-12-07), 6 service processes in 11 had a second team after registering their first tasks and
    served 16 streams about 25% slower, the engine's OpenMP worker asleep half the time (CPU time 1.7 s against the
    engine thread's 3.3 s in a burst; 2.9 s and 2.9 s in the other processes)."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix="icm-lora-worker", initializer=_one_thread)


async def _load(
    app: FastAPI,
    startup: Startup,
    settings: Settings,
    placement: Placement,
    metrics: ServiceMetrics,
    refiner: Refiner | None,
) -> None:
    try:
        state = await _build_state(settings, placement, metrics, refiner)
    except Exception as exc:  # the process stays up and says why: /healthz and /readyz answer 503 "failed"
        log.exception("icm-lora could not start")
        startup.fail(f"{type(exc).__name__}: {exc}")
        return
    app.state.icm = state
    # Everything loaded so far (the model, tokenizers, the generator: some 400,000 tracked objects) lives as long as
    # the process: frozen, the collector's full passes skip it (unfrozen, one pass took 179-219 ms, timed with
    # gc.callbacks; bench/scheduling.py --gc-freeze 0,1: streams' longest gap 240 / 322 ms frozen, 414 / 428 ms not).
    # vLLM's engine does the same after its start-up.
    gc.collect()
    gc.freeze()
    startup.ready(state)


@dataclass
class _Models:
    """What loads slowly (in a worker thread, while the port is already open)."""

    base: BaseModel
    checkpoint: GeneratorCheckpoint | None
    engine: Engine
    generator: AdapterGenerator | None
    checker: AdapterChecker | None


def _load_models(settings: Settings, placement: Placement, metrics: ServiceMetrics) -> _Models:
    transformers_logging.disable_progress_bar()  # service logs get one line per step, never progress bars
    threads = TORCH_THREADS if settings.engine_threads == -1 else settings.engine_threads
    if threads:  # before anything runs multi-threaded: only the engine thread gets an OpenMP team (EngineConfig)
        torch.set_num_threads(1)
    base = load_base_model(settings.base_model, settings.data_dir, placement, progress=False)
    checkpoint = _load_checkpoint(settings)
    lora = checkpoint.layout.settings if checkpoint else LoraSettings()
    engine = start_engine(settings, base, metrics, lora.rank, lora.target_modules, threads)
    generator = checker = None
    if checkpoint is not None:
        # the task encoder reads hidden states through the engine, and the self-check scores answers through it:
        # one copy of the base model in memory (refinement trains on its own copy, loaded on first use)
        reader = engine.hidden_state_reader(checkpoint.encoder.hidden_layer, checkpoint.encoder.max_length)
        precision = dtype_name(placement.dtype)
        encoder = TaskEncoder(MiniLMEmbedder(), reader, base.hidden_size, checkpoint.encoder, precision)
        generator = AdapterGenerator(checkpoint, encoder, settings.condition)
        read, length = checkpoint.encoder.max_examples, checkpoint.encoder.max_length
        checker = AdapterChecker(engine.answer_logprobs, base.tokenizer, read, length, settings.self_check_margin)
    return _Models(base, checkpoint, engine, generator, checker)


async def _build_state(
    settings: Settings, placement: Placement, metrics: ServiceMetrics, refiner: Refiner | None
) -> ServiceState:
    start = time.perf_counter()
    if settings.use_redis_tasks and not settings.redis_url:
        raise ValueError("ICM_LORA_TASK_STORE=redis needs ICM_LORA_REDIS_URL")
    models = await asyncio.to_thread(_load_models, settings, placement, metrics)
    base, checkpoint, engine = models.base, models.checkpoint, models.engine
    redis = (
        Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        if settings.redis_url
        else None
    )
    redis_tier = RedisTier(redis, settings.redis_prefix, settings.adapter_ttl_s, metrics) if redis else None
    store: TaskStore
    if settings.use_redis_tasks:
        assert redis is not None  # checked above
        store = RedisTaskStore(redis, settings.redis_prefix, settings.adapter_spec_ttl_s)
    else:
        store = SqliteTaskStore(settings.data_dir / "tasks.sqlite3")
    cache = AdapterCache(settings.memory_cache_size, metrics, redis_tier)
    if checkpoint is not None:
        refiner = refiner or TrainingRefiner(
            settings.base_model, settings.data_dir, checkpoint.layout.settings, placement
        )
    adapters = AdapterService(models.generator, cache, store, metrics, models.checker, refiner, settings.self_check)

    def forget(adapter_ids: list[str]) -> None:  # another replica deleted them (or this one: already done)
        for adapter_id in adapter_ids:
            cache.forget(adapter_id)
            engine.release_adapter(adapter_id)

    invalidations = Invalidations(settings.redis_url, settings.redis_prefix, forget) if settings.redis_url else None
    state = ServiceState(
        settings=settings,
        metrics=metrics,
        base=base,
        store=store,
        cache=cache,
        adapters=adapters,
        refinements=RefinementQueue(adapters, store, metrics, settings.refine_queue_size),
        engine=engine,
        downloads=DownloadCache(metrics),
        redis_tier=redis_tier,
        started_at=time.time(),
        invalidations=invalidations,
    )
    if invalidations is not None:
        state.background.append(asyncio.create_task(invalidations.run()))
    if redis_tier is not None:
        await redis_tier.ping()
    log.info(
        "icm-lora ready in %.1f s (model %s on %s, generator %s)",
        time.perf_counter() - start,
        base.name,
        placement,
        models.generator.generator_id if models.generator else None,
    )
    return state


def _load_checkpoint(settings: Settings) -> GeneratorCheckpoint | None:
    path = settings.resolved_generator_path()
    if path is None:
        log.warning("no generator checkpoint for %s: adapter generation answers 503", settings.base_model)
        return None
    return load_checkpoint(path)


async def _close_state(state: ServiceState) -> None:
    for task in state.background:
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    if state.invalidations is not None:
        await state.invalidations.close()
    state.adapters.close()  # a running refinement stops at its next step
    await state.refinements.close()
    state.engine.close()
    await state.store.close()
    if state.redis_tier is not None:
        await state.redis_tier.redis.aclose()
    gc.unfreeze()  # what start-up froze can be collected again (tests start many services in one process)
