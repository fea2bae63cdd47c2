"""Continuous batching on one background thread.

Each iteration of the loop, between two forward passes:

1. runs the calls other threads queued for the model (hidden-state reads, adapter preloads);
2. drops cancelled requests (their slot pin and KV rows go with them);
3. admits waiting requests while the batch has room: each gets its adapter's slot (pinned; copied in when it is
   not resident, evicting the least recently used unpinned slot) and all admitted requests are prefilled together
   in one left-padded forward pass, then merged into the running batch;
4. runs one decode step for every running row, each row with its own slot, and retires the rows that finished.

The running rows form one or more *decode groups* (``_Group``), each with its own left-padded KV cache and one
forward pass per step. Joining rows go into the group where they add the least padding (positions x rows the others
or they would attend to in vain); when even that costs more memory traffic per step than a second pass over the
model's weights, they start a group of their own (at most ``EngineConfig.max_decode_groups``). So a 2,000-token
prompt that finishes its prefill beside short streams decodes in its own group: the short streams do not attend over
2,000 padded positions, and no group's cache is rebuilt. Groups whose padding together would cost less than a pass
merge.

Requests are admitted in arrival order. A request whose adapter needs a slot while every slot is pinned waits; later
requests that need no new slot (no adapter, or an adapter already resident) may go ahead of it, later ones that need a
swap may not, so a waiting adapter gets the next slot that frees up.

Everything that touches the model, the slots or the slot table runs on this thread, so none of it needs a lock;
the waiting queue and the call queue are shared with submitters under one condition variable.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from service.engine.config import EngineConfig
from service.engine.errors import EngineClosed, EngineError, QueueFull
from service.engine.fused import FusedKV, Segment, chunk_mask, fused_pass, fused_passes_unavailable
from service.engine.kv_cache import BatchKVCache
from service.engine.lora_layers import NO_SLOT, LoraBank, PreparedAdapter, SwapEvents
from service.engine.observer import EngineObserver, EngineStats, GuardedObserver
from service.engine.pacing import ChunkPacer
from service.engine.prefix_cache import PrefixCache
from service.engine.requests import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationResult,
    RequestHandle,
    StreamDelta,
)
from service.engine.sampling import SamplingParams, TokenLogprob, choose_tokens, token_logprobs
from service.engine.slots import SlotTable
from service.engine.text import TextStream

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A request inside the engine, from submission to its last token."""

    request_id: str
    prompt_ids: list[int]
    adapter: PreparedAdapter | None
    params: SamplingParams
    seed: int | None
    generator: torch.Generator | None
    handle: RequestHandle
    text: TextStream
    submitted_at: float = field(default_factory=time.perf_counter)
    slot: int = NO_SLOT
    needs_load: bool = False
    evicted: str | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    position: int = 0  # tokens of this request in the KV cache
    first_token_at: float | None = None
    chunk_cache: BatchKVCache | None = None  # a long prompt's own cache while it is prefilled chunk by chunk

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter is None else self.adapter.adapter_id

    @property
    def reach(self) -> int:
        """The most positions this request can hold in the KV cache."""
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass(eq=False)
class _Group:
    """Running rows that decode in one forward pass: their cache and, on the device, the token each feeds next
    [B, 1] and its position [B, 1] (advanced in place by the decode step; rebuilt only when rows join or leave)."""

    rows: list[Job]
    cache: BatchKVCache
    next_ids: torch.Tensor
    positions: torch.Tensor

    def add(
        self, rows: list[Job], cache: BatchKVCache, next_ids: torch.Tensor, positions: torch.Tensor, capacity: int
    ) -> None:
        """Append rows with their cache: in place when they fit (``BatchKVCache.join``), else the cache is rebuilt
        once with room for ``capacity`` rows."""
        if not self.cache.join(cache):
            self.cache = BatchKVCache.concat([self.cache, cache], row_capacity=capacity)
        self.rows.extend(rows)
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.positions = torch.cat([self.positions, positions])


@dataclass(frozen=True)
class _Chunk:
    """The next chunk of a long prompt: prompt positions [done, end) of ``job``, read into ``cache``."""

    job: Job
    cache: BatchKVCache
    done: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.done

    @property
    def last(self) -> bool:
        return self.end == len(self.job.prompt_ids)


def _padding_added(group_rows: int, group_length: int, rows: int, length: int) -> int:
    """Positions x rows attended in vain if ``rows`` of ``length`` join a group of ``group_rows`` of
    ``group_length`` (left padding: the shorter side attends over the longer one's extra positions)."""
    if length <= group_length:
        return rows * (group_length - length)
    return group_rows * (length - group_length)


def _right_aligned(opening: int, width: int, rests: Sequence[int]) -> torch.Tensor:
    """[rows, opening + width] source positions that move each row's opening next to the rest of its prompt (read
    right-aligned after the opening), padding first: the padding positions are arbitrary (zeroed afterwards)."""
    rows = []
    for rest in rests:
        pad = width - rest
        rows.append([0] * pad + list(range(opening)) + list(range(opening + pad, opening + width)))
    return torch.tensor(rows, dtype=torch.long)


def _left_padded(length: int, real: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros((len(real), length), dtype=torch.bool)
    for i, n in enumerate(real):
        mask[i, length - n :] = True
    return mask


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """KV cache bytes of one position of one row: keys and values of every layer."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    element = next(model.parameters()).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element


class Scheduler:
    def __init__(
        self,
        model: PreTrainedModel,
        bank: LoraBank,
        config: EngineConfig,
        observer: EngineObserver,
        eos_ids: set[int],
        max_positions: int,
        pad_id: int,
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.bank = bank
        self.table = SlotTable(config.num_slots)
        self.config = config
        self.observer = GuardedObserver(observer)
        self.eos_ids = eos_ids
        self.max_positions = max_positions
        self.pad_id = pad_id
        self.prefixes = prefixes if prefixes is not None else PrefixCache((), 0)
        self.device = bank.device
        self.num_layers = int(model.config.num_hidden_layers)
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        # a second decode group costs one more pass over the weights per step: as much memory traffic as this many
        # padded KV positions (one row each)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.group_cost_positions = max(1, weight_bytes // self.kv_bytes_per_token)
        # a 4D mask goes to the attention as it is: SDPA takes a bool mask, eager attention (Gemma 2's soft-capping)
        # adds it to the scores, so it needs 0 / -inf
        self._attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        # the rows' real lengths, for the decode attention that attends each row alone (bf16 / fp16: attention.py)
        self._pass_row_lengths = bank.dtype != torch.float32
        self._additive_mask = self._attention == "eager"
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._arriving = 0  # requests on their way to submit (Engine.arrival)
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.threads_set = threading.Event()  # the engine thread has applied config.threads
        self._groups: list[_Group] = []
        self._prefilling: deque[Job] = deque()  # long prompts, prefilled one chunk per loop iteration
        # chunk sizes by time while rows decode; the CPU only (on CUDA a pass returns before the GPU has run it)
        target_s = config.prefill_chunk_target_ms / 1000 if self.device.type == "cpu" else 0.0
        self.pacer = ChunkPacer(target_s, config.prefill_chunk)
        self.fuse_passes = False  # decode groups and a prefill chunk in one forward pass per step (fused.py)
        self.fused_chunks_total = 0  # prefill chunks read in a fused pass
        # the last few steps' passes without a chunk: what a chunk adds to (their median: one pass can be slow)
        self._decode_passes: deque[float] = deque(maxlen=5)
        if config.fused_passes:
            reason = fused_passes_unavailable(model, self.device)
            self.fuse_passes = reason is None
            log.info("decode groups and prefill chunks %s", "share one pass" if reason is None else f"apart: {reason}")
        self._pending_swaps: list[tuple[str, int, str | None, SwapEvents]] = []  # CUDA copies not timed yet
        self.swaps_total = 0
        self.swap_seconds_total = 0.0
        self.tokens_total = 0
        self.finished_total = 0
        self.steps_total = 0

    @property
    def _rows(self) -> list[Job]:
        """Every running row, group by group."""
        return [job for group in self._groups for job in group.rows]

    # --- any thread -------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="icm-lora-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def on_engine_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.config.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()

    def submit_many(self, jobs: Sequence[Job]) -> None:
        """All or none, under one lock: the loop sees them together and admits them to one prefill."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) + len(jobs) > self.config.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting, {len(jobs)} more do not fit "
                    f"(max_queue={self.config.max_queue})"
                )
            self._waiting.extend(jobs)
            self._cond.notify_all()

    def arrival_opened(self) -> None:
        with self._cond:
            self._arriving += 1

    def arrival_closed(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def _hold_for_arrivals(self) -> None:
        """Under the lock: an idle engine with requests waiting holds their prefill while other requests are still on
        their way to ``submit``, at most ``arrival_wait_ms``: over HTTP a burst's requests reach the engine one at a
        time as the event loop parses them, and the first would otherwise be prefilled alone while the rest waited for
        that pass (16 chat streams on a 2-core VM: time to first token 105 ms for the first, 430-470 ms for the others,
        against 305 ms for all 16 submitted at once). Engine calls are never held."""
        if self._groups or self._prefilling or not self._waiting or self.config.arrival_wait_ms <= 0:
            return
        deadline = time.monotonic() + self.config.arrival_wait_ms / 1000
        while self._arriving > 0 and not (self._closing or self._calls):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def wake(self, _handle: RequestHandle | None = None) -> None:
        with self._cond:
            self._cond.notify_all()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between two steps; its result (or exception) comes back in the future."""
        future: Future[T] = Future()
        if self.on_engine_thread:
            _run_into(fn, future)
            return future
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def stats(self) -> EngineStats:
        groups = list(self._groups)
        return EngineStats(
            swaps_total=self.swaps_total,
            swap_seconds_total=self.swap_seconds_total,
            adapters_resident=len(self.table.resident),
            slots_total=self.table.num_slots,
            slots_pinned=self.table.pinned_slots,
            queue_depth=len(self._waiting),
            running=len(self._rows),
            tokens_generated_total=self.tokens_total,
            requests_finished_total=self.finished_total,
            decode_steps_total=self.steps_total,
            kv_cache_bytes=sum(group.cache.nbytes() for group in groups),
            decode_groups=len(groups),
            prefix_hits_total=self.prefixes.hits_total,
            prefix_misses_total=self.prefixes.misses_total,
            fused_chunks_total=self.fused_chunks_total,
            arriving=self._arriving,
        )

    # --- engine thread ----------------------------------------------------------------------------------------

    def load_now(self, adapter: PreparedAdapter) -> int:
        """Make ``adapter`` resident without pinning it (a preload); return its slot."""
        lease = self.table.acquire(adapter.adapter_id)
        try:
            if lease.needs_load:
                self._copy_in(adapter, lease.slot, lease.evicted)
        finally:
            if self.table.owner(lease.slot) == adapter.adapter_id:  # not invalidated by a failed copy
                self.table.release(lease.slot)
        return lease.slot

    def _run(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
            torch.get_num_threads()  # fixes this thread's OpenMP setting before anyone restores the global one
        self.threads_set.set()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closing or self._calls or self._waiting or self._groups or self._prefilling):
                        self._cond.wait()
                    if self._closing:
                        break
                    self._hold_for_arrivals()
                    calls, self._calls = self._calls, []
                    cancelled, admitted = self._take_admissible()
                try:
                    self._iteration(calls, cancelled, admitted)
                except Exception as exc:  # a bug must not leave callers waiting forever
                    log.exception("engine iteration failed")
                    self._fail_all_running([*admitted, *self._prefilling, *self._rows], exc)
            self._shutdown()

    def _iteration(
        self, calls: list[tuple[Callable[[], Any], Future[Any]]], cancelled: list[Job], admitted: list[Job]
    ) -> None:
        self._report_finished_swaps()
        for fn, future in calls:
            _run_into(fn, future)
        for job in cancelled:
            self._finish(job, FINISH_CANCELLED)
        self._drop_cancelled_rows()
        if admitted:
            short = [job for job in admitted if len(job.prompt_ids) <= self.config.prefill_chunk]
            self._prefilling.extend(self._load_slots([job for job in admitted if job not in short]))
            if short:
                self._prefill(short)
        if self.fuse_passes and self._groups and (self._prefilling or len(self._groups) > 1):
            self._fused_step()
            return
        if self._prefilling:
            self._prefill_chunk()
        if self._groups:
            self._decode_step()

    def _fail_all_running(self, jobs: list[Job], exc: BaseException) -> None:
        self._clear_rows()
        self._prefilling.clear()
        for job in dict.fromkeys(jobs):  # unique, in order
            if job.handle.done:
                continue
            error = EngineError(f"engine failure: {exc}")
            try:
                self._finish(job, FINISH_ERROR, error)
            except Exception:
                job.handle.fail(error)

    def _take_admissible(self) -> tuple[list[Job], list[Job]]:
        """Under the lock: pop cancelled waiting jobs, and the jobs that fit in the batch (their slots pinned)."""
        cancelled: list[Job] = []
        admitted: list[Job] = []
        room = self.config.max_batch_size - len(self._rows) - len(self._prefilling)
        width = 0
        swap_blocked = False
        # the KV budget: rows x the longest reach (prompt + max_tokens) of the batch, the cache being left-padded
        reserved_rows = len(self._rows) + len(self._prefilling)
        reach = max((job.reach for job in [*self._rows, *self._prefilling]), default=0)
        budget_tokens = self.config.kv_cache_bytes // self.kv_bytes_per_token
        memory_blocked = False
        keep: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.handle.cancel_requested:
                cancelled.append(job)
                continue
            n = len(job.prompt_ids)
            chunked = n > self.config.prefill_chunk  # prefilled on its own, chunk by chunk: no width limit
            too_wide = not chunked and admitted and (len(admitted) + 1) * max(width, n) > self.config.max_prefill_tokens
            over_budget = (reserved_rows + len(admitted) + 1) * max(reach, job.reach) > budget_tokens
            if len(admitted) >= room or too_wide or memory_blocked or over_budget:
                memory_blocked = memory_blocked or over_budget  # in arrival order: later ones wait behind it
                keep.append(job)
                continue
            if job.adapter is not None:
                adapter_id = job.adapter.adapter_id
                if self.table.needs_load(adapter_id) and (swap_blocked or not self.table.can_acquire(adapter_id)):
                    swap_blocked = True
                    keep.append(job)
                    continue
                lease = self.table.acquire(adapter_id)
                job.slot, job.needs_load, job.evicted = lease.slot, lease.needs_load, lease.evicted
            admitted.append(job)
            reach = max(reach, job.reach)
            if not chunked:
                width = max(width, n)
        self._waiting = keep
        return cancelled, admitted

    def _copy_in(self, adapter: PreparedAdapter, slot: int, evicted: str | None) -> None:
        start = time.perf_counter()
        try:
            events = self.bank.load(slot, adapter)
        except Exception:
            self.table.invalidate(slot)
            raise
        self.swaps_total += 1
        if events is None:
            self._report_swap(adapter.adapter_id, slot, evicted, time.perf_counter() - start)
        else:  # an asynchronous CUDA copy: timed by its events once it has run
            self._pending_swaps.append((adapter.adapter_id, slot, evicted, events))

    def _report_swap(self, adapter_id: str, slot: int, evicted: str | None, seconds: float) -> None:
        self.swap_seconds_total += seconds
        self.observer.on_swap(adapter_id, slot, seconds, evicted)

    def _report_finished_swaps(self) -> None:
        """Time the CUDA slot copies that have run (``Event.query`` does not wait)."""
        if not self._pending_swaps:
            return
        pending = []
        for adapter_id, slot, evicted, (start, done) in self._pending_swaps:
            if done.query():
                self._report_swap(adapter_id, slot, evicted, start.elapsed_time(done) / 1000.0)
            else:
                pending.append((adapter_id, slot, evicted, (start, done)))
        self._pending_swaps = pending

    def _load_slots(self, jobs: list[Job]) -> list[Job]:
        """Copy in the adapters that admission said must be loaded; the jobs whose load failed are finished with an
        error, the others returned."""
        ready: list[Job] = []
        failed: dict[int, str] = {}  # slot -> why its load failed (the table forgot it, with all its pins)
        for job in jobs:
            if job.needs_load and job.adapter is not None:
                try:
                    self._copy_in(job.adapter, job.slot, job.evicted)
                except Exception as exc:
                    log.exception("loading adapter %s failed", job.adapter_id)
                    failed[job.slot] = str(exc)
                job.needs_load = False
            if job.slot in failed:
                reason = failed[job.slot]
                job.slot = NO_SLOT  # nothing to release: invalidate dropped the pins
                self._finish(job, FINISH_ERROR, EngineError(f"loading the adapter failed: {reason}"))
                continue
            ready.append(job)
        return ready

    def _prefill(self, jobs: list[Job]) -> None:
        ready = self._load_slots(jobs)
        if not ready:
            return
        start = time.perf_counter()
        skip = self.prefixes.covers(ready)  # the chat template's opening, when its keys and values are cached
        width = max(len(job.prompt_ids) - skip for job in ready)
        ids = torch.full((len(ready), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ready), skip + width), dtype=torch.bool)
        mask[:, :skip] = True
        for i, job in enumerate(ready):
            rest = job.prompt_ids[skip:]
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[i, skip + width - len(rest) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = any(len(job.prompt_ids) - skip < width for job in ready)  # known on the host
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)[:, skip:]
        cache = BatchKVCache(self.num_layers)
        try:
            if skip:
                self.prefixes.seed(cache, ready, width)
            self.bank.activate([job.slot for job in ready])
            out = self.model(
                input_ids=ids,
                attention_mask=mask.long() if padded else None,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            if skip and padded:  # padding between the opening and the rest: left-pad every row again
                rests = [len(job.prompt_ids) - skip for job in ready]
                cache.realign(_right_aligned(skip, width, rests).to(self.device))
                mask = _left_padded(skip + width, [skip + r for r in rests]).to(self.device)
            cache.mask = mask
            cache.zero_padding()
            misses = 0 if skip else self.prefixes.remember(cache, ready)
            params = [job.params for job in ready]
            logits = out.logits[:, -1, :]
            sampled = choose_tokens(logits, params, [job.generator for job in ready])
            tokens = sampled.tolist()
            logprobs = token_logprobs(logits, params, tokens)  # per-token log-probabilities hook (rows that ask)
        except Exception as exc:
            log.exception("prefill failed")
            for job in ready:
                self._finish(job, FINISH_ERROR, EngineError(f"prefill failed: {exc}"))
            return
        self.observer.on_prefill(len(ready), int(ids.numel()), time.perf_counter() - start)
        if skip or misses:
            self.observer.on_prefix(len(ready) if skip else 0, misses)
        self._join(ready, cache, sampled, tokens, logprobs)

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest long prompt, into its own cache: one forward pass between two decode steps,
        so running streams keep their pace while a long prompt is read. A chunk is ``prefill_chunk`` tokens, or, with
        ``prefill_chunk_target_ms`` and rows decoding, as many as fit that time (``ChunkPacer``). After its last
        chunk the request samples its first token and joins the batch."""
        chunk = self._next_chunk(decoding=bool(self._groups))
        if chunk is None:
            return
        start = time.perf_counter()
        try:
            ids = torch.tensor([chunk.job.prompt_ids[chunk.done : chunk.end]], dtype=torch.long).to(self.device)
            positions = torch.arange(chunk.done, chunk.end, dtype=torch.long).view(1, -1).to(self.device)
            self.bank.activate([chunk.job.slot])
            out = self.model(input_ids=ids, position_ids=positions, cache=chunk.cache, use_cache=True, logits_to_keep=1)
        except Exception as exc:
            log.exception("chunked prefill failed")
            self._chunk_failed(chunk.job, exc)
            return
        finally:
            seconds = time.perf_counter() - start
            self.observer.on_prefill(1, chunk.tokens, seconds)
            self.observer.on_chunk(chunk.tokens, seconds, fused=False)
            if self._groups:  # rows waited for this pass
                self.pacer.observe(chunk.tokens, seconds)
        self._chunk_read(chunk, out.logits[:, -1, :])

    def _next_chunk(self, decoding: bool) -> _Chunk | None:
        """The next chunk of the oldest long prompt (None when that prompt was cancelled: it is retired here);
        ``decoding``: rows will wait for its pass (the pacer sizes it)."""
        job = self._prefilling[0]
        if job.handle.cancel_requested:
            self._prefilling.popleft()
            self._finish(job, FINISH_CANCELLED)
            return None
        cache = job.chunk_cache = job.chunk_cache or BatchKVCache(self.num_layers)
        done = cache.length
        return _Chunk(job, cache, done, min(done + self.pacer.size(decoding), len(job.prompt_ids)))

    def _chunk_read(self, chunk: _Chunk, logits: torch.Tensor) -> None:
        """``chunk`` was read; after the last one (``logits``: its last position's, [1, V]) the request samples its
        first token and joins the batch."""
        if not chunk.last:
            return
        job = chunk.job
        try:
            self._prefilling.popleft()
            job.chunk_cache = None
            chunk.cache.mask = torch.ones((1, chunk.end), dtype=torch.bool, device=self.device)
            sampled = choose_tokens(logits, [job.params], [job.generator])
            tokens = sampled.tolist()
            logprobs = token_logprobs(logits, [job.params], tokens)
        except Exception as exc:
            log.exception("chunked prefill failed")
            self._chunk_failed(job, exc)
            return
        self._join([job], chunk.cache, sampled, tokens, logprobs)

    def _chunk_failed(self, job: Job, exc: BaseException) -> None:
        """Retire a long prompt whose chunk failed (the caller logged why)."""
        if self._prefilling and self._prefilling[0] is job:
            self._prefilling.popleft()
        job.chunk_cache = None
        self._finish(job, FINISH_ERROR, EngineError(f"prefill failed: {exc}"))

    def _fused_step(self) -> None:
        """Every decode group's step, and the next chunk of the oldest long prompt if one is being read, in one
        forward pass (``fused.py``: one pass over the weights instead of one per group and chunk). The pacer sizes
        the chunk by what it adds to the groups' pass."""
        chunk = self._next_chunk(decoding=True) if self._prefilling else None
        groups = list(self._groups)
        rows = sum(len(group.rows) for group in groups)
        start = time.perf_counter()
        try:
            segments = [
                Segment(g.cache, len(g.rows), 1, self._step_mask(g), self._row_lengths(g)) for g in groups
            ]  # _step_mask opens each group's position for this step
            ids = [g.next_ids.view(-1) for g in groups]
            positions = [g.positions.view(-1) for g in groups]
            keep = list(range(rows))
            if chunk is not None:
                done, end = chunk.done, chunk.end
                segments.append(Segment(chunk.cache, 1, chunk.tokens, chunk_mask(done, chunk.tokens, self.device)))
                ids.append(torch.tensor(chunk.job.prompt_ids[done:end], dtype=torch.long).to(self.device))
                positions.append(torch.arange(done, end, dtype=torch.long).to(self.device))
                if chunk.last:
                    keep.append(rows + chunk.tokens - 1)
            kv = FusedKV(segments, self._attention)
            self.bank.activate([row.slot for g in groups for row in g.rows])
            self.bank.activate_split(rows, chunk.job.slot if chunk is not None else None)
            try:
                with fused_pass(self.model, kv):
                    out = self.model(
                        input_ids=torch.cat(ids).view(1, -1),
                        position_ids=torch.cat(positions).view(1, -1),
                        cache=kv,
                        use_cache=True,
                        logits_to_keep=torch.tensor(keep, device=self.device),
                    )
            finally:
                self.bank.end_split()
            logits = out.logits[0]  # [rows (+ 1 after a prompt's last chunk), V]
        except Exception as exc:
            log.exception("fused decode step failed")
            for group in groups:
                self._groups.remove(group)
                for row in group.rows:
                    self._finish(row, FINISH_ERROR, EngineError(f"decode step failed: {exc}"))
            if chunk is not None:
                self._chunk_failed(chunk.job, exc)
            return
        seconds = time.perf_counter() - start
        if chunk is None:
            self._decode_passes.append(seconds)
        else:
            self.fused_chunks_total += 1
            decode_s = statistics.median(self._decode_passes) if self._decode_passes else None
            added = seconds - decode_s if decode_s is not None else seconds
            self.observer.on_prefill(1, chunk.tokens, max(added, 0.0))
            self.observer.on_chunk(chunk.tokens, max(added, 0.0), fused=True)
            if decode_s is not None and added > 0:
                self.pacer.observe(chunk.tokens, added)
        offset = 0
        for group in groups:
            n = len(group.rows)
            self._decoded(group, logits[offset : offset + n])
            offset += n
        if chunk is not None:
            self._chunk_read(chunk, logits[rows:])
        self._merge_groups()

    def _join(
        self,
        ready: list[Job],
        cache: BatchKVCache,
        sampled: torch.Tensor,
        tokens: list[int],
        logprobs: Sequence[TokenLogprob | None],
    ) -> None:
        """Prefilled requests (their first token sampled) join the running batch."""
        self._count_tokens(len(ready))
        keep = []
        for i, job in enumerate(ready):
            job.position = len(job.prompt_ids)
            if not self._accept(job, tokens[i], logprobs[i]):
                keep.append(i)
        if not keep:
            return
        next_ids = sampled.view(-1, 1)
        positions = torch.tensor([[job.position] for job in ready], dtype=torch.long).to(self.device, non_blocking=True)
        if len(keep) < len(ready):
            index = torch.tensor(keep, dtype=torch.long).to(self.device, non_blocking=True)
            cache.select(keep, index)
            next_ids, positions = next_ids.index_select(0, index), positions.index_select(0, index)
        rows = [ready[i] for i in keep]
        costs = [_padding_added(len(g.rows), g.cache.length, len(rows), cache.length) for g in self._groups]
        best = min(range(len(costs)), key=costs.__getitem__, default=None)
        room = len(self._groups) < self.config.max_decode_groups
        if best is None or (costs[best] > self.group_cost_positions and room):
            grouped = BatchKVCache.concat([cache], row_capacity=self.config.max_batch_size if best is None else 0)
            self._groups.append(_Group(rows, grouped, next_ids, positions))
            return
        self._groups[best].add(rows, cache, next_ids, positions, self.config.max_batch_size)

    def _decode_step(self) -> None:
        """One token for every running row: one forward pass per decode group; then groups that would now cost less
        together than apart merge."""
        for group in list(self._groups):
            self._decode_group(group)
        self._merge_groups()

    def _decode_group(self, group: _Group) -> None:
        """One token for every row of ``group``. Its inputs stay on the device (the tokens sampled by the previous
        step, positions advanced in place, the padding mask's new column written in place); the only
        device-to-host transfer is this step's sampled tokens."""
        start = time.perf_counter()
        try:
            attention = self._step_mask(group)
            self.bank.activate([job.slot for job in group.rows])
            out = self.model(
                input_ids=group.next_ids,
                attention_mask=attention,
                position_ids=group.positions,
                cache=group.cache,
                use_cache=True,
                decode_lengths=self._row_lengths(group),
            )
        except Exception as exc:
            log.exception("decode step failed")
            self._groups.remove(group)
            for job in group.rows:
                self._finish(job, FINISH_ERROR, EngineError(f"decode step failed: {exc}"))
            return
        logits = out.logits[:, -1, :]
        if len(self._groups) == 1:
            self._decode_passes.append(time.perf_counter() - start)
        self._decoded(group, logits)

    def _step_mask(self, group: _Group) -> torch.Tensor | None:
        """Open the group's cache for this step's token; its padding mask as the attention takes it (None: no
        padding)."""
        mask = group.cache.append_position()
        return self._padding_mask(mask) if group.cache.has_padding() else None

    def _row_lengths(self, group: _Group) -> list[int] | None:
        return group.cache.real_lengths() if self._pass_row_lengths else None

    def _decoded(self, group: _Group, logits: torch.Tensor) -> None:
        """A decode step's ``logits`` [B, V] for ``group``'s rows: sample, stream, retire the rows that finished."""
        rows, positions = group.rows, group.positions
        try:
            params = [job.params for job in rows]
            sampled = choose_tokens(logits, params, [job.generator for job in rows], [job.output_ids for job in rows])
            tokens = sampled.tolist()  # the step's one device-to-host transfer (more only for rows asking logprobs)
            logprobs = token_logprobs(logits, params, tokens)  # per-token log-probabilities hook (rows that ask)
        except Exception as exc:
            log.exception("decode step failed")
            self._groups.remove(group)
            for job in rows:
                self._finish(job, FINISH_ERROR, EngineError(f"decode step failed: {exc}"))
            return
        group.next_ids = sampled.view(-1, 1)
        positions += 1
        self.steps_total += 1
        self.observer.on_batch(len(rows))
        self._count_tokens(len(rows))
        keep = []
        for i, job in enumerate(rows):
            job.position += 1
            if not self._accept(job, tokens[i], logprobs[i]):
                keep.append(i)
        self._retain(group, keep)

    def _merge_groups(self) -> None:
        """Merge the two groups that add the least padding together, when that costs less than their extra pass
        (their rows always fit: admission keeps every running row within ``max_batch_size``)."""
        if len(self._groups) < 2:
            return
        pairs = [
            (_padding_added(len(a.rows), a.cache.length, len(b.rows), b.cache.length), i, j)
            for i, a in enumerate(self._groups)
            for j, b in enumerate(self._groups)
            if i < j
        ]
        cost, i, j = min(pairs)
        if cost > self.group_cost_positions:
            return
        b = self._groups.pop(j)
        self._groups[i].add(b.rows, b.cache, b.next_ids, b.positions, self.config.max_batch_size)

    def _padding_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, T] bool -> the [B, 1, 1, T] mask of a decode step, in the form the model's attention takes."""
        mask = mask[:, None, None, :]
        if not self._additive_mask:
            return mask
        dtype = self.bank.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)

    def _accept(self, job: Job, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a generated token, stream it; return True when the job finished (and was retired)."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.observer.on_first_token(now - job.submitted_at)
        job.output_ids.append(token)
        if logprob is not None:
            job.logprobs.append(logprob)
        text = job.text.push(token)
        reason: str | None = None
        if job.text.stopped or (token in self.eos_ids and not job.params.ignore_eos):
            reason = FINISH_STOP
        elif len(job.output_ids) >= job.params.max_tokens or job.position >= self.max_positions:
            reason = FINISH_LENGTH
        if reason is not None:
            text += job.text.flush()
        job.handle.push(StreamDelta(text, (token,), reason, () if logprob is None else (logprob,)))
        if reason is not None:
            self._finish(job, reason, push=False)
            return True
        return False

    def _drop_cancelled_rows(self) -> None:
        for group in list(self._groups):
            if not any(job.handle.cancel_requested for job in group.rows):
                continue
            keep = []
            for i, job in enumerate(group.rows):
                if job.handle.cancel_requested:
                    self._finish(job, FINISH_CANCELLED)
                else:
                    keep.append(i)
            self._retain(group, keep)

    def _retain(self, group: _Group, keep: Sequence[int]) -> None:
        """Keep only these rows of ``group`` (the others were finished already); an empty group goes."""
        if len(keep) == len(group.rows):
            return
        if not keep:
            self._groups.remove(group)
            return
        order = group.cache.retain(keep)  # in place; the rows after the new end moved into the holes
        group.rows = [group.rows[i] for i in order]
        index = torch.tensor(order, dtype=torch.long).to(self.device, non_blocking=True)
        group.next_ids = group.next_ids.index_select(0, index)
        group.positions = group.positions.index_select(0, index)

    def _clear_rows(self) -> None:
        self._groups = []

    def _finish(self, job: Job, reason: str, error: BaseException | None = None, push: bool = True) -> None:
        if job.slot != NO_SLOT:
            self.table.release(job.slot)
            job.slot = NO_SLOT
        if push:
            job.handle.push(StreamDelta(job.text.flush() if reason != FINISH_ERROR else "", (), reason))
        now = time.perf_counter()
        result = GenerationResult(
            request_id=job.request_id,
            adapter_id=job.adapter_id,
            prompt_tokens=len(job.prompt_ids),
            token_ids=list(job.output_ids),
            text=job.text.text,
            finish_reason=reason,
            seed=job.seed,
            time_to_first_token=None if job.first_token_at is None else job.first_token_at - job.submitted_at,
            seconds=now - job.submitted_at,
            logprobs=list(job.logprobs) if job.params.logprobs is not None else None,
        )
        self.finished_total += 1
        if error is None:
            job.handle.finish(result)
        else:
            job.handle.fail(error, result)
        self.observer.on_request_done(result)

    def _count_tokens(self, n: int) -> None:
        self.tokens_total += n
        self.observer.on_tokens(n)

    def _shutdown(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = self._calls, []
        for _fn, future in calls:
            future.set_exception(EngineClosed("the engine is closed"))
        for job in [*self._rows, *self._prefilling, *waiting]:
            self._finish(job, FINISH_ERROR, EngineClosed("the engine was closed while the request ran"))
        self._clear_rows()
        self._prefilling.clear()


def _run_into(fn: Callable[[], T], future: Future[T]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
