"""create_app(settings) and its lifespan: load the base model, the generator and the stores, then serve."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from generator.base_model import load_base_model
from generator.checkpoint import GeneratorCheckpoint, load_checkpoint
from generator.config import LoraSettings
from generator.device import Placement
from generator.generate import AdapterGenerator
from generator.task_encoder import MiniLMEmbedder, TaskEncoder
from service.adapters import AdapterService
from service.api.middleware import BodySizeLimit, RequestId, RequestMetrics
from service.api.routes import adapters, health, openai, tasks
from service.api.security import Guard, RateLimiter
from service.cache import AdapterCache, Invalidations, RedisTier
from service.config import Settings, get_settings
from service.errors import install_error_handlers
from service.inference import start_engine
from service.metrics import ServiceMetrics
from service.refine import Refiner, TrainingRefiner
from service.refinements import RefinementQueue
from service.selfcheck import AdapterChecker
from service.state import ServiceState
from service.task_store import RedisTaskStore, SqliteTaskStore, TaskStore

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, refiner: Refiner | None = None) -> FastAPI:
    """``refiner``: what trains refined adapters; default a ``TrainingRefiner`` on a private copy of the base model.

    The device and dtype are resolved here, before the server starts: ``PlacementError`` (a ``ValueError``) says why
    they cannot be used (``icm-lora serve`` prints it and exits 2)."""
    settings = settings or get_settings()
    placement = settings.placement()
    metrics = ServiceMetrics(redis_configured=bool(settings.redis_url))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await _build_state(settings, placement, metrics, refiner)
        app.state.icm = state
        try:
            yield
        finally:
            await _close_state(state)

    app = FastAPI(
        title="icm-lora",
        version="0.1.0",
        summary="LoRA adapters generated on demand from a task description and examples, and served.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    limiter = (
        RateLimiter(settings.rate_limit_per_minute, settings.redis_url, settings.redis_prefix)
        if settings.rate_limit_per_minute > 0
        else None
    )
    guard = Guard([k.get_secret_value() for k in settings.api_keys], limiter)
    v1 = [Depends(guard)]
    app.include_router(adapters.router, dependencies=v1)
    app.include_router(tasks.router, dependencies=v1)
    app.include_router(openai.router, dependencies=v1)
    app.include_router(health.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestId)  # outermost: even a 413 from BodySizeLimit carries the id
    return app


async def _build_state(
    settings: Settings, placement: Placement, metrics: ServiceMetrics, refiner: Refiner | None
) -> ServiceState:
    start = time.perf_counter()
    base = load_base_model(settings.base_model, settings.data_dir, placement)
    redis = (
        Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        if settings.redis_url
        else None
    )
    redis_tier = RedisTier(redis, settings.redis_prefix, settings.adapter_ttl_s, metrics) if redis else None
    store: TaskStore
    if settings.use_redis_tasks:
        if redis is None:
            raise ValueError("ICM_LORA_TASK_STORE=redis needs ICM_LORA_REDIS_URL")
        store = RedisTaskStore(redis, settings.redis_prefix, settings.adapter_spec_ttl_s)
    else:
        store = SqliteTaskStore(settings.data_dir / "tasks.sqlite3")
    checkpoint = _load_checkpoint(settings)
    cache = AdapterCache(settings.memory_cache_size, metrics, redis_tier)
    lora = checkpoint.layout.settings if checkpoint else LoraSettings()
    engine = start_engine(settings, base, metrics, max_rank=lora.rank, target_modules=lora.target_modules)
    generator = checker = None
    if checkpoint is not None:
        # the task encoder reads hidden states through the engine, and the self-check scores answers through it:
        # one copy of the base model in memory (refinement trains on its own copy, loaded on first use)
        reader = engine.hidden_state_reader(checkpoint.encoder.hidden_layer, checkpoint.encoder.max_length)
        encoder = TaskEncoder(MiniLMEmbedder(), reader, base.hidden_size, checkpoint.encoder)
        generator = AdapterGenerator(checkpoint, encoder)
        read, length = checkpoint.encoder.max_examples, checkpoint.encoder.max_length
        checker = AdapterChecker(engine.answer_logprobs, base.tokenizer, read, length, settings.self_check_margin)
        refiner = refiner or TrainingRefiner(settings.base_model, settings.data_dir, lora, placement)
    adapters = AdapterService(generator, cache, store, metrics, checker, refiner, settings.self_check)

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
        redis_tier=redis_tier,
        engine=engine,
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
        generator.generator_id if generator else None,
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
    if state.engine is not None:
        state.engine.close()
    await state.store.close()
    if state.redis_tier is not None:
        await state.redis_tier.redis.aclose()
