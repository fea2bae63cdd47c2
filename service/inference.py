"""Between the OpenAI-compatible routes and the engine: model -> adapter, prompts -> token ids, limits, errors."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TypeVar

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel
from generator.refine import refined_adapter_id
from service.adapters import refine_plan
from service.api.arrivals import submitted
from service.config import Settings
from service.engine import (
    AdapterError,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineObserver,
    NoFreeSlot,
    PreparedAdapter,
    QueueFull,
    RequestError,
    RequestHandle,
    RequestTooLarge,
    SamplingParams,
)
from service.engine.sampling import TokenLogprob
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.schemas import (
    ChatLogprobs,
    ChatMessage,
    CompletionLogprobs,
    ServingInfo,
    TokenLogprobOut,
    TopLogprob,
    _SamplingFields,
)
from service.selfcheck import check_of, choose_adapter
from service.state import ServiceState
from service.task_store import TaskRecord

RequestT = TypeVar("RequestT", bound=_SamplingFields)

WARNING_HEADER = "X-ICM-LoRA-Warning"


class PrometheusObserver(EngineObserver):
    """Engine hooks -> service metrics (called on the engine thread; prometheus_client is thread-safe)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def on_swap(self, adapter_id: str, slot: int, seconds: float, evicted: str | None) -> None:
        self.metrics.swaps.inc()
        self.metrics.swap_seconds.observe(seconds)

    def on_batch(self, size: int) -> None:
        self.metrics.batch_size.observe(size)

    def on_prepare(self, adapter_id: str, seconds: float) -> None:
        self.metrics.preparations.inc()

    def on_chunk(self, tokens: int, seconds: float, fused: bool) -> None:
        self.metrics.prefill_chunks.labels("true" if fused else "false").inc()

    def on_prefix(self, hits: int, misses: int) -> None:
        if hits:
            self.metrics.prefix_cache.labels("hit").inc(hits)
        if misses:
            self.metrics.prefix_cache.labels("miss").inc(misses)

    def on_first_token(self, seconds: float) -> None:
        self.metrics.time_to_first_token.observe(seconds)

    def on_tokens(self, count: int) -> None:
        self.metrics.tokens_generated.inc(count)


def start_engine(
    settings: Settings,
    base: BaseModel,
    metrics: ServiceMetrics,
    max_rank: int,
    target_modules: Sequence[str],
    threads: int = 0,
) -> Engine:
    """The engine on ``base`` with the service's settings; ``threads``: the engine thread's (0: torch's as it is)."""
    config = EngineConfig(
        num_slots=settings.num_slots,
        max_rank=max_rank,
        target_modules=tuple(target_modules),
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        kv_cache_bytes=settings.kv_cache_mb * 2**20,
        prefill_chunk=settings.prefill_chunk,
        prefill_chunk_target_ms=settings.prefill_chunk_ms,
        max_decode_groups=settings.max_decode_groups,
        prefix_cache_entries=settings.prefix_cache_entries,
        packed_linears=settings.packed_linears,
        matmul_decode_attention=settings.matmul_decode_attention,
        fused_passes=settings.fused_passes,
        attend_rows_alone=settings.attend_rows_alone,
        arrival_wait_ms=settings.arrival_wait_ms,
        threads=threads,
    )
    engine = Engine(base, config, PrometheusObserver(metrics))
    metrics.queue_depth.set_function(lambda: engine.stats().queue_depth)
    metrics.adapters_resident.set_function(lambda: engine.stats().adapters_resident)
    metrics.queue_capacity.set(settings.max_queue)
    metrics.packed_weights_bytes.set(engine.packing.nbytes)
    metrics.slots.set(settings.num_slots)
    return engine


async def resolve_task(state: ServiceState, model: str) -> TaskRecord | None:
    """``model`` is the base model's name (None) or a registered task id (its record); 404 otherwise."""
    if model == state.settings.model_name:
        return None
    record = await state.store.get(model)
    if record is None:
        raise APIError(
            404, f"model {model!r} is neither a registered task id nor {state.settings.model_name!r}", "model_not_found"
        )
    return record


def with_task_defaults(body: RequestT, record: TaskRecord | None) -> RequestT:
    """The request with the task's stored generation defaults (``PATCH /v1/tasks/{id}``) for the fields it does not
    set itself; a field the request sets, even to its default value, wins."""
    if record is None:
        return body
    unset = {name: value for name, value in record.defaults.items() if name not in body.model_fields_set}
    return body.model_copy(update=unset) if unset else body


async def resolve_adapter(
    state: ServiceState, record: TaskRecord | None
) -> tuple[PreparedAdapter | None, ServingInfo | None]:
    """For a task (``resolve_task``): the adapter the self-check policy picks (None: the base model), prepared for
    the engine, and what to tell the client about it. None for the base model."""
    if record is None:
        return None, None
    generated, _ = await state.adapters.for_task(record.spec, record.seed)
    check = record.self_check if record.self_check is not None else check_of(generated)
    choice = choose_adapter(state.settings.self_check, generated.adapter_id, check, record.refinement)
    adapter: GeneratedAdapter | None = generated
    if choice.use == "refined":
        adapter = await _refined(state, record, generated, choice.adapter_id)
    elif choice.use == "base":
        adapter = None
    info = ServingInfo(
        adapter_id=choice.adapter_id,
        served="base" if adapter is None else "adapter",
        refined=choice.adapter_id != generated.adapter_id,
        warning=choice.warning,
    )
    return (None if adapter is None else await prepare(state, adapter)), info


async def prepare(state: ServiceState, adapter: GeneratedAdapter) -> PreparedAdapter:
    """The engine's prepared copy of ``adapter``: the one made before (a dictionary lookup), or made now in a worker
    thread (checks and slot layout, a few milliseconds: never on the event loop)."""
    engine: Engine = state.engine
    found = engine.prepared(adapter.adapter_id)
    if found is not None:
        return found
    try:
        return await asyncio.to_thread(engine.prepare_adapter, adapter)
    except AdapterError as exc:
        raise APIError(422, f"the adapter cannot be served by this engine: {exc}") from None


async def _refined(
    state: ServiceState, record: TaskRecord, generated: GeneratedAdapter, adapter_id: str
) -> GeneratedAdapter:
    """The task's refined adapter: cached, regenerated from its stored spec, or, when it was deleted
    (``DELETE /v1/adapters/{id}``), refined again from the task's own refinement (same plan, same id)."""
    try:
        adapter, _ = await state.adapters.by_id(adapter_id)
        return adapter
    except APIError as exc:
        plan = refine_plan(state.settings, record.refinement.steps)
        if exc.status != 404 or refined_adapter_id(generated.adapter_id, plan) != adapter_id:
            raise
    adapter, _ = await state.adapters.refined(generated, record.spec, record.seed, plan)
    return adapter


def serving_headers(info: ServingInfo | None) -> dict[str, str]:
    return {WARNING_HEADER: info.warning} if info is not None and info.warning else {}


def completion_prompt_ids(state: ServiceState, prompt: str) -> list[int]:
    """BOS + the prompt's tokens: the same framing as LoRA training and evaluation (``generator.batching``)."""
    bos = state.base.tokenizer.bos_token_id
    ids = state.engine.encode(prompt)  # the engine's tokenizer lock: fast tokenizers are not thread-safe
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return _check_prompt(state, ids)


def chat_prompt_ids(state: ServiceState, messages: Sequence[ChatMessage]) -> list[int]:
    if not getattr(state.base.tokenizer, "chat_template", None):
        raise APIError(400, f"base model {state.base.name!r} has no chat template; use /v1/completions")
    try:
        ids = state.engine.chat_prompt([m.template_message() for m in messages])
    except RequestError as exc:
        raise APIError(400, str(exc)) from None
    return _check_prompt(state, ids)


def _check_prompt(state: ServiceState, ids: list[int]) -> list[int]:
    if len(ids) > state.settings.max_prompt_tokens:
        raise APIError(400, f"prompt has {len(ids)} tokens; the limit is {state.settings.max_prompt_tokens}")
    if not ids:
        raise APIError(400, "the prompt is empty")
    return ids


def sampling_params(state: ServiceState, body: _SamplingFields, logprobs: int | None, prompts: int) -> SamplingParams:
    """The engine's settings for each choice (OpenAI's defaults where a field is absent or null)."""
    limit = body.token_limit
    max_tokens = limit if limit is not None else min(64, state.settings.max_tokens)
    if max_tokens > state.settings.max_tokens:
        raise APIError(422, f"max_tokens {max_tokens} is above this server's limit of {state.settings.max_tokens}")
    choices = body.choices_per_prompt * prompts
    if choices > state.settings.max_queue:
        raise APIError(
            422, f"{choices} choices (prompts × n) are more than this server queues ({state.settings.max_queue})"
        )
    bias = tuple((int(token), value) for token, value in (body.logit_bias or {}).items())
    vocab = state.engine.vocab_size
    outside = [token for token, _ in bias if token >= vocab]
    if outside:
        raise APIError(422, f"logit_bias: token id {outside[0]} is outside the vocabulary (0..{vocab - 1})")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=tuple(body.stop or ()),
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(422, str(exc)) from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One setting per choice of a prompt: with a seed, choice j samples with seed + j (n equal seeds would give n
    equal choices)."""
    if params.seed is None or n == 1:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + j) % 2**63) for j in range(n)]


def submit(
    state: ServiceState,
    prompts: Sequence[list[int]],
    adapter: PreparedAdapter | None,
    params: Sequence[SamplingParams],
) -> list[RequestHandle]:
    """Queue every choice on the engine at once (all or none), mapping its errors to HTTP ones; the request's
    arrival (``service.api.arrivals``) ends here."""
    try:
        return state.engine.submit_many(prompts, [adapter] * len(prompts), params)
    except QueueFull:
        raise APIError(429, "the inference queue is full; retry shortly", "overloaded", {"Retry-After": "1"}) from None
    except RequestTooLarge as exc:
        raise APIError(413, str(exc)) from None
    except RequestError as exc:
        raise APIError(400, str(exc)) from None
    except AdapterError as exc:
        raise APIError(422, f"the adapter cannot be served by this engine: {exc}") from None
    except EngineClosed:
        raise APIError(503, "the engine is shutting down", headers={"Retry-After": "1"}) from None
    finally:
        submitted()


async def prompt_logprobs(
    state: ServiceState, ids: list[int], adapter: PreparedAdapter | None, top_k: int
) -> list[TokenLogprob | None]:
    """One entry per prompt token: its log-probability given the tokens before it (``echo`` with ``logprobs``).
    The beginning-of-sequence token the service puts in front is not part of the prompt's text and is left out;
    a prompt that starts without one has None for its first token."""
    try:
        scored = await asyncio.to_thread(state.engine.prompt_logprobs, ids, adapter, top_k)
    except NoFreeSlot:
        raise APIError(503, "every adapter slot is busy; retry shortly", headers={"Retry-After": "1"}) from None
    except AdapterError as exc:
        raise APIError(422, f"the adapter cannot be served by this engine: {exc}") from None
    except EngineClosed:
        raise APIError(503, "the engine is shutting down", headers={"Retry-After": "1"}) from None
    if ids[0] == state.base.tokenizer.bos_token_id:
        return list(scored)
    return [None, *scored]


LOGPROB_FLOOR = -9999.0  # JSON has no -infinity; OpenAI reports this for impossible tokens


def _token_names(state: ServiceState, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[int, str]:
    ids = set(tokens)
    for entry in entries:
        if entry is not None:
            ids.update(token for token, _ in entry.top)
    unique = sorted(ids)
    return dict(zip(unique, state.engine.token_texts(unique), strict=True))


def completion_logprobs(
    state: ServiceState, tokens: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int
) -> CompletionLogprobs:
    """OpenAI's completion ``logprobs`` for these tokens (an entry of None: a first prompt token with nothing
    before it), with text offsets counted from ``offset`` by each token's own text."""
    names = _token_names(state, tokens, entries)
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in zip(tokens, entries, strict=True):
        out.tokens.append(names[token])
        out.text_offset.append(offset)
        offset += len(names[token])
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(max(entry.logprob, LOGPROB_FLOOR))
            out.top_logprobs.append({names[t]: max(lp, LOGPROB_FLOOR) for t, lp in entry.top})
    return out


def chat_logprobs(state: ServiceState, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    names = _token_names(state, [e.token for e in entries], entries)

    def top(token: int, logprob: float) -> TopLogprob:
        name = names[token]
        return TopLogprob(token=name, logprob=max(logprob, LOGPROB_FLOOR), bytes=list(name.encode("utf-8")))

    return ChatLogprobs(
        content=[
            TokenLogprobOut(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
            for e in entries
        ]
    )
