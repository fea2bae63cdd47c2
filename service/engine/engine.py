"""The public face of the serving engine.

One ``Engine`` owns the resident base model (wrapped in place with LoRA slots), a slot table and the batching loop on
a background thread. Callers submit requests from any thread or event loop and get a ``RequestHandle`` to stream
from; ``generate`` is the blocking helper for scripts.

    engine = Engine(load_base_model("smollm2-135m"))
    result = engine.generate("Hello", adapter=generated_adapter, max_tokens=32)
    async for delta in engine.stream("Hello", adapter=generated_adapter, params=SamplingParams(max_tokens=32)):
        print(delta.text, end="")
    engine.close()
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar, Unpack

import torch
from transformers import PreTrainedTokenizerBase

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel
from generator.batching import AnswerGroup
from service.engine.attention import DecodeAttention, decode_attention_unavailable
from service.engine.config import EngineConfig
from service.engine.errors import AdapterError, RequestError, RequestTooLarge
from service.engine.hidden import EngineHiddenStateReader
from service.engine.lora_layers import LoraBank, PreparedAdapter
from service.engine.observer import EngineObserver, EngineStats, GuardedObserver
from service.engine.packed import PackedWeights, packing_unavailable
from service.engine.prefix_cache import PrefixCache, chat_opening
from service.engine.requests import GenerationResult, RequestHandle, StreamDelta
from service.engine.sampling import MAX_TOP_LOGPROBS, SamplingKeywords, SamplingParams, TokenLogprob
from service.engine.scheduler import Job, Scheduler
from service.engine.scoring import prompt_logprobs, score_groups
from service.engine.text import TextStream

log = logging.getLogger("icm_lora.engine")
T = TypeVar("T")

Prompt = str | Sequence[int]
AdapterLike = GeneratedAdapter | PreparedAdapter | None


class Arrival:
    """A request on its way to ``Engine.submit`` (``EngineConfig.arrival_wait_ms``): ``close`` it once the request
    has been submitted or has failed; closing twice is harmless."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._open = True
        scheduler.arrival_opened()

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
        self._scheduler.arrival_closed()


class Engine:
    """Serve ``base`` with ``config.num_slots`` LoRA slots. The model is wrapped in place (its target Linears become
    ``SlottedLoraLinear``) and must already be on its device; ``close()`` gives the plain Linears back. Every method is
    thread-safe; the model itself only runs on the engine's own thread."""

    def __init__(
        self, base: BaseModel, config: EngineConfig | None = None, observer: EngineObserver | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.base_name = base.name
        self.model = base.model
        self.tokenizer = base.tokenizer
        # Fast tokenizers are not safe to share between threads ("Already borrowed"): callers encode under a lock,
        # the engine thread decodes with its own copy.
        self._encode_lock = threading.Lock()
        self._decode_tokenizer = copy.deepcopy(base.tokenizer)
        self.model.eval()
        self.packing = PackedWeights()
        self.bank = LoraBank(
            self.model, self.config.num_slots, self.config.max_rank, self.config.target_modules, self.packing
        )
        if self.config.packed_linears:
            reason = packing_unavailable(self.bank.device, self.bank.dtype)
            if reason is None:
                self.packing.install(self.model, self.config.max_batch_size)
                log.info("generation runs on packed Linear weights (%.0f MB more memory)", self.packing.nbytes / 2**20)
            else:
                log.info("packed Linears off: %s", reason)
        self.attention = DecodeAttention()
        # fp32: the matmul path, a speed option; bf16 / fp16 on the CPU: rows attend alone, so that a row's tokens do
        # not depend on the others' padding (attention.py)
        low_precision = self.bank.dtype != torch.float32
        if (low_precision and self.config.attend_rows_alone) or (
            not low_precision and self.config.matmul_decode_attention
        ):
            reason = decode_attention_unavailable(self.model, self.bank.device, self.bank.dtype)
            if reason is None:
                self.attention.install(self.model)
                log.info("decode steps attend %s", "row by row" if low_precision else "through batched matmuls")
            else:
                log.info("decode attention stays SDPA's: %s", reason)
        model_config = self.model.config
        self.vocab_size = int(model_config.vocab_size)
        self.max_positions = int(getattr(model_config, "max_position_embeddings", 2048))
        self.eos_token_ids = frozenset(_eos_ids(self.model, self.tokenizer))  # a request ends at any of these
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self._observer = GuardedObserver(observer or EngineObserver())
        self._scheduler = Scheduler(
            self.model,
            self.bank,
            self.config,
            observer or EngineObserver(),
            eos_ids=set(self.eos_token_ids),
            max_positions=self.max_positions,
            pad_id=int(pad),
            prefixes=PrefixCache(chat_opening(self.tokenizer, chat_token_ids), self.config.prefix_cache_entries),
        )
        self.pad_id = int(pad)
        # prepared adapters by id (an adapter id names its weights: the slot table trusts it the same way)
        self._prepared: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._prepared_total = 0
        self._ids = itertools.count()
        self._closed = False
        caller_threads = torch.get_num_threads()
        self._scheduler.start()
        if self.config.threads:
            self._scheduler.threads_set.wait()
            torch.set_num_threads(caller_threads)  # the engine thread keeps config.threads, every other its own

    @property
    def device(self) -> torch.device:
        return self.bank.device

    # --- requests ---------------------------------------------------------------------------------------------

    def arrival(self) -> Arrival:
        """Tell the engine of a request that will be submitted soon: while one is open, an idle engine holds a waiting
        request's prefill (at most ``EngineConfig.arrival_wait_ms``) so that both share one pass."""
        return Arrival(self._scheduler)

    def submit(
        self,
        prompt: Prompt,
        adapter: AdapterLike = None,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        **sampling: Unpack[SamplingKeywords],
    ) -> RequestHandle:
        """Queue a request (thread-safe, does not block); sampling settings as ``params`` or as keywords
        (``max_tokens=16``). Raises ``QueueFull``, ``AdapterError``, ``RequestError``."""
        job = self._job(prompt, adapter, _params(params, sampling), request_id)
        self._scheduler.submit(job)
        return job.handle

    def submit_many(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[AdapterLike] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestHandle]:
        """Queue several requests at once (all or none); the loop sees them together, so they share one prefill and
        one batch as far as the batch's room, the slots and ``max_prefill_tokens`` allow."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        per_request = _per_request(params, len(prompts))
        jobs = [self._job(p, a, s, None) for p, a, s in zip(prompts, adapters, per_request, strict=True)]
        self._scheduler.submit_many(jobs)
        return [job.handle for job in jobs]

    def generate(
        self,
        prompt: Prompt,
        adapter: AdapterLike = None,
        params: SamplingParams | None = None,
        **sampling: Unpack[SamplingKeywords],
    ) -> GenerationResult:
        """Blocking helper: ``engine.generate("Hi", adapter=a, max_tokens=16)``."""
        return self.submit(prompt, adapter, params, **sampling).result()

    def generate_many(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[AdapterLike] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        return [handle.result() for handle in self.submit_many(prompts, adapters, params)]

    async def agenerate(
        self,
        prompt: Prompt,
        adapter: AdapterLike = None,
        params: SamplingParams | None = None,
        **sampling: Unpack[SamplingKeywords],
    ) -> GenerationResult:
        handle = self.submit(prompt, adapter, params, **sampling)
        try:
            return await handle.wait()
        finally:
            handle.cancel()  # no-op when finished; frees the request when the awaiting task was cancelled

    async def stream(
        self,
        prompt: Prompt,
        adapter: AdapterLike = None,
        params: SamplingParams | None = None,
        **sampling: Unpack[SamplingKeywords],
    ) -> AsyncIterator[StreamDelta]:
        """Submit and yield the deltas; closing the iterator early (client gone) cancels the request."""
        handle = self.submit(prompt, adapter, params, **sampling)
        try:
            async for delta in handle:
                yield delta
        finally:
            handle.cancel()  # no-op when finished

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as a prompt (as ``tokenizer(text)``), except that text spelling a special token
        (``"</s>"``, ``"<|im_start|>"``) is plain text, never that token's id; safe from any thread."""
        with self._encode_lock:
            return list(self.tokenizer(text, split_special_tokens=True)["input_ids"])

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat (``[{"role": ..., "content": ...}]``) through the tokenizer's chat template, ending
        with the assistant's turn; safe from any thread. The template's own special tokens are special; a message's
        content is plain text even where it spells one (``RequestError`` for a template that rewrites contents)."""
        with self._encode_lock:
            return chat_token_ids(self.tokenizer, messages)

    # --- adapters ---------------------------------------------------------------------------------------------

    def prepare_adapter(self, adapter: GeneratedAdapter | PreparedAdapter) -> PreparedAdapter:
        """Check an adapter against this engine once (``AdapterError`` if it cannot be served); the result can be
        passed to ``submit`` many times without checking again."""
        if isinstance(adapter, PreparedAdapter):
            self.bank.check(adapter)
            return adapter
        if not isinstance(adapter, GeneratedAdapter):
            raise AdapterError(f"expected a GeneratedAdapter, got {type(adapter).__name__}")
        known = self.prepared(adapter.adapter_id)
        if known is not None:
            return known
        if self.config.check_base_model and adapter.base_model and adapter.base_model != self.base_name:
            raise AdapterError(
                f"adapter {adapter.adapter_id!r} was made for base model {adapter.base_model!r}, "
                f"this engine serves {self.base_name!r}"
            )
        start = time.perf_counter()
        prepared = self.bank.prepare(adapter)
        self._observer.on_prepare(adapter.adapter_id, time.perf_counter() - start)
        with self._prepared_lock:
            self._prepared_total += 1
            self._prepared[adapter.adapter_id] = prepared
            while len(self._prepared) > self.config.max_prepared:
                self._prepared.popitem(last=False)
        return prepared

    def prepared(self, adapter_id: str) -> PreparedAdapter | None:
        """The adapter prepared earlier under this id (a use: it becomes the most recently used), or None. Cheap:
        callers on an event loop prepare in a worker thread only when this is None."""
        with self._prepared_lock:
            found = self._prepared.get(adapter_id)
            if found is not None:
                self._prepared.move_to_end(adapter_id)
            return found

    def load_adapter(self, adapter: GeneratedAdapter | PreparedAdapter) -> int:
        """Copy an adapter into a slot now (evicting the least recently used unpinned one); return the slot.
        Raises ``NoFreeSlot`` when every slot is pinned."""
        prepared = self.prepare_adapter(adapter)
        return self._scheduler.call(lambda: self._scheduler.load_now(prepared)).result()

    def release_adapter(self, adapter_id: str) -> bool:
        """Free the adapter's slot when no running request pins it (a deleted task); True when a slot was freed.
        A pinned slot stays until its requests finish, then ages out like any other."""

        with self._prepared_lock:
            self._prepared.pop(adapter_id, None)

        def release() -> bool:
            table = self._scheduler.table
            slot = table.slot_of(adapter_id)
            if slot is None or table.pins(slot) > 0:
                return False
            table.invalidate(slot)
            return True

        return self._scheduler.call(release).result()

    def resident_adapters(self) -> dict[str, int]:
        """Adapter id -> slot, least recently used first."""
        return dict(self._scheduler.call(lambda: self._scheduler.table.resident).result())

    # --- task encoder support ---------------------------------------------------------------------------------

    def hidden_state_reader(self, layer: int | None = None, max_length: int = 96) -> EngineHiddenStateReader:
        """A ``HiddenStateReader`` over the resident base model, adapter-free, in forward passes of at most
        ``config.prefill_chunk`` padded tokens (decode steps run between them)."""
        return EngineHiddenStateReader(
            self._exact_call,
            self.model,
            self.tokenizer,
            self.bank,
            layer,
            max_length,
            self._encode_lock,
            budget=self.config.prefill_chunk,
        )

    def answer_logprobs(
        self,
        groups: Sequence[AnswerGroup],
        adapters: Sequence[GeneratedAdapter | PreparedAdapter | None],
        budget: int | None = None,
    ) -> torch.Tensor:
        """[len(adapters), answers] mean log-probability per answer token of each group's answers, for each adapter
        (None: the base model), all in the same forward passes: the self-check's ``AnswerScorer``, computed by the
        resident model on the engine thread, in passes of about ``budget`` tokens (default ``config.prefill_chunk``)
        with decode steps between them. Blocks the calling thread; never call it from the engine thread."""
        if self._scheduler.on_engine_thread:
            raise RuntimeError("answer_logprobs() cannot be used from the engine thread")
        prepared = [None if a is None else self.prepare_adapter(a) for a in adapters]
        return score_groups(
            self._exact_call,
            self.model,
            self.bank,
            self._scheduler.load_now,
            groups,
            prepared,
            self.pad_id,
            self.config.prefill_chunk if budget is None else budget,
        )

    def prompt_logprobs(
        self, prompt_ids: Sequence[int], adapter: GeneratedAdapter | PreparedAdapter | None, top_k: int = 0
    ) -> list[TokenLogprob]:
        """For each prompt token after the first: its log-probability given the ones before it and the ``top_k``
        most likely tokens there, with ``adapter`` (loaded when not resident) or the base model; one forward pass on
        the engine thread (the scoring path of ``answer_logprobs``). Blocks; never call it from the engine thread."""
        if self._scheduler.on_engine_thread:
            raise RuntimeError("prompt_logprobs() cannot be used from the engine thread")
        if not 0 <= top_k <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_k must be in [0, {MAX_TOP_LOGPROBS}], got {top_k}")
        ids = self._prompt_ids(prompt_ids)
        prepared = None if adapter is None else self.prepare_adapter(adapter)
        return prompt_logprobs(
            self._scheduler.call, self.model, self.bank, self._scheduler.load_now, ids, prepared, top_k
        )

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens spelled out, a partial UTF-8 character as U+FFFD); safe from any
        thread. For log-probability listings, where every token needs a name."""
        with self._encode_lock:
            return [str(self.tokenizer.decode([int(t)])) for t in token_ids]

    # --- lifecycle and metrics --------------------------------------------------------------------------------

    def stats(self, sync: bool = False) -> EngineStats:
        """Counters and gauges, cheap from any thread. ``sync=True`` takes them on the engine thread between two
        steps (waits up to one step), so they reflect every request that has finished so far."""
        stats = self._scheduler.call(self._scheduler.stats).result() if sync else self._scheduler.stats()
        return dataclasses.replace(stats, adapters_prepared_total=self._prepared_total)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine loop between two steps; requests submitted meanwhile are admitted together on exit."""
        if self._scheduler.on_engine_thread:
            raise RuntimeError("paused() cannot be used from the engine thread")
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait()

        future = self._scheduler.call(hold)
        while not entered.wait(0.05):
            if future.done():
                future.result()  # raises EngineClosed
        try:
            yield
        finally:
            release.set()
            future.result()

    def close(self) -> None:
        """Stop the loop (unfinished requests fail with ``EngineClosed``) and give the model its plain Linears back."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        self.attention.uninstall()
        self.packing.uninstall()
        self.bank.uninstall()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------------------------

    def _exact_call(self, fn: Callable[[], T]) -> Future[T]:
        """``fn`` on the engine thread on the plain weights: the passes that make adapters (hidden-state reads, the
        self-check's scoring) stay bit-equal to the offline pipeline's when generation runs on packed ones."""
        return self._scheduler.call(functools.partial(self.packing.run_exact, fn))

    def _job(self, prompt: Prompt, adapter: AdapterLike, params: SamplingParams, request_id: str | None) -> Job:
        ids = self._prompt_ids(prompt)
        if len(ids) + params.max_tokens > self.max_positions:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of "
                f"{self.max_positions} tokens"
            )
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise RequestError(f"logit_bias token id {outside[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        need = (len(ids) + params.max_tokens) * self._scheduler.kv_bytes_per_token
        if need > self.config.kv_cache_bytes:
            raise RequestTooLarge(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) need {need} bytes of KV cache; this "
                f"engine's budget is {self.config.kv_cache_bytes} bytes"
            )
        prepared = None if adapter is None else self.prepare_adapter(adapter)
        seed = generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        request_id = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, self._scheduler.wake)
        return Job(
            request_id=request_id,
            prompt_ids=ids,
            adapter=prepared,
            params=params,
            seed=seed,
            generator=generator,
            handle=handle,
            text=TextStream(self._decode_tokenizer, ids, params.stop),
        )

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"token ids {bad[:3]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if not ids:
            raise RequestError("the prompt is empty")
        return ids


_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use placeholders for message contents


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat template's token ids, with every message's content tokenised as plain text.

    Without special-token text in any content this is ``tokenizer(template_text, add_special_tokens=False)``.
    Otherwise the template is rendered around a placeholder per message; the template's text is tokenised as usual
    (its own special tokens stay special) and each content in its place with ``split_special_tokens=True``, so a
    user's "</s>" or "<|im_start|>" never becomes a control token.
    """
    messages = [dict(m) for m in messages]
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]
    if not any(s in str(m.get("content", "")) for m in messages for s in specials):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    rendered = str(tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False))
    ids: list[int] = []
    placed: list[int] = []
    position = 0
    for match in _MARK.finditer(rendered):
        index = int(match.group(1))
        ids += tokenizer(rendered[position : match.start()], add_special_tokens=False)["input_ids"]
        ids += tokenizer(messages[index]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        placed.append(index)
        position = match.end()
    ids += tokenizer(rendered[position:], add_special_tokens=False)["input_ids"]
    if sorted(placed) != list(range(len(messages))):
        raise RequestError(
            "this model's chat template rewrites message contents, so a message that spells a special token "
            "cannot be tokenised as plain text; remove the special-token text"
        )
    return ids


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _params(params: SamplingParams | None, sampling: SamplingKeywords) -> SamplingParams:
    if params is not None and sampling:
        raise RequestError("give either params or sampling keywords, not both")
    if params is not None:
        return params
    try:
        return SamplingParams(**sampling)
    except TypeError as exc:
        raise RequestError(f"unknown sampling setting: {exc}") from None


def _per_request(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    listed = list(params)
    if len(listed) != n:
        raise RequestError(f"{n} prompts but {len(listed)} sampling parameter sets")
    return listed
