"""Answer log-likelihoods from the resident model: the self-check's scorer without a second copy of the base model.

Same semantics as ``generator.selfcheck.LoraModelScorer`` (groups packed into rows by ``pack_groups``, mean
log-probability per answer token, ``generator.batching.packed_answer_logprobs``), computed by the engine's own model.
The base model and the adapters are scored in the same forward pass: each adapter gets a copy of the rows, on its
slot (the base model's rows on none). Runs on the engine thread between decode steps, like the hidden states of
``hidden.py``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from transformers import PreTrainedModel

from generator.batching import AnswerGroup, group_length, pack_groups, packed_answer_logprobs
from service.engine.errors import NoFreeSlot
from service.engine.lora_layers import NO_SLOT, LoraBank, PreparedAdapter
from service.engine.sampling import TokenLogprob, logprobs_of

LoadNow = Callable[[PreparedAdapter], int]
PROMPT_ROWS = 256
Submit = Callable[[Callable[[], object]], Future[object]]


def score_batch(
    model: PreTrainedModel,
    bank: LoraBank,
    load_now: LoadNow,
    groups: Sequence[AnswerGroup],
    adapters: Sequence[PreparedAdapter | None],
    pad_id: int,
) -> torch.Tensor:
    """On the engine thread: [len(adapters), answers] mean log-probability per answer token, fp32 on the CPU."""
    slots = [NO_SLOT if a is None else load_now(a) for a in adapters]  # resident and unpinned until we return
    if len(set(s for s in slots if s != NO_SLOT)) != sum(a is not None for a in adapters):
        raise NoFreeSlot("the adapters to score do not fit in the slots at once")
    batch = pack_groups(groups, pad_id, copies=len(adapters))
    bank.activate([s for s in slots for _ in range(batch.rows_per_copy)])
    with torch.inference_mode():
        scores = packed_answer_logprobs(model, batch)
    return scores.view(len(adapters), -1).to("cpu", torch.float32)


def score_groups(
    submit: Submit,
    model: PreTrainedModel,
    bank: LoraBank,
    load_now: LoadNow,
    groups: Sequence[AnswerGroup],
    adapters: Sequence[PreparedAdapter | None],
    pad_id: int,
    budget: int,
    slot_wait_s: float = 30.0,
) -> torch.Tensor:
    """``groups`` in consecutive batches of about ``budget`` tokens (``budget_batches``), each batch one call on the
    engine thread (retried while every slot is pinned); the next call is submitted when the last has returned, so
    running streams take a decode step between two batches."""
    if not groups or not adapters:
        raise ValueError("nothing to score")
    out = []
    for batch in budget_batches(groups, len(adapters), budget):
        fn = functools.partial(score_batch, model, bank, load_now, batch, adapters, pad_id)
        scores = _call_with_slot(submit, fn, slot_wait_s)
        assert isinstance(scores, torch.Tensor)
        out.append(scores)
    return torch.cat(out, dim=1)


def budget_batches(groups: Sequence[AnswerGroup], copies: int, budget: int) -> list[list[AnswerGroup]]:
    """Consecutive runs of ``groups`` whose tokens (each group's packed length, times ``copies``: the base model's
    rows and each adapter's) add up to at most ``budget``; a group over the budget on its own is a run of one."""
    runs: list[list[AnswerGroup]] = [[]]
    tokens = 0
    for group in groups:
        size = group_length(group) * copies
        if runs[-1] and tokens + size > budget:
            runs.append([])
            tokens = 0
        runs[-1].append(group)
        tokens += size
    return runs


def _activate(bank: LoraBank, load_now: LoadNow, adapter: PreparedAdapter | None, rows: int) -> None:
    if adapter is None:
        bank.activate(None)
    else:
        slot = load_now(adapter)  # resident and unpinned; nothing else runs on this thread until we return
        bank.activate([slot] * rows)


def _call_with_slot(submit: Submit, fn: Callable[[], object], slot_wait_s: float) -> object:
    """One call on the engine thread; while every slot is pinned by running requests it is retried until one frees
    up (``NoFreeSlot`` after ``slot_wait_s``)."""
    deadline = time.monotonic() + slot_wait_s
    while True:
        try:
            return submit(fn).result()
        except NoFreeSlot:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def prompt_logprobs_now(
    model: PreTrainedModel,
    bank: LoraBank,
    load_now: LoadNow,
    ids: Sequence[int],
    adapter: PreparedAdapter | None,
    top_k: int,
) -> list[TokenLogprob]:
    """On the engine thread: for each prompt token after the first, its log-probability given the tokens before it
    (and the ``top_k`` most likely tokens at its position), with ``adapter`` or the base model."""
    _activate(bank, load_now, adapter, 1)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)], device=bank.device), use_cache=False).logits[0]
        out: list[TokenLogprob] = []
        for start in range(0, len(ids) - 1, PROMPT_ROWS):  # a long prompt's [T, V] log-softmax a block at a time
            end = min(start + PROMPT_ROWS, len(ids) - 1)
            out += logprobs_of(logits[start:end], ids[start + 1 : end + 1], top_k)
    return out


def prompt_logprobs(
    submit: Submit,
    model: PreTrainedModel,
    bank: LoraBank,
    load_now: LoadNow,
    ids: Sequence[int],
    adapter: PreparedAdapter | None,
    top_k: int,
    slot_wait_s: float = 30.0,
) -> list[TokenLogprob]:
    """``prompt_logprobs_now`` as one call on the engine thread (the scoring path of ``echo`` with logprobs)."""
    if len(ids) < 2:
        return []
    fn = functools.partial(prompt_logprobs_now, model, bank, load_now, ids, adapter, top_k)
    result = _call_with_slot(submit, fn, slot_wait_s)
    assert isinstance(result, list)
    return result
