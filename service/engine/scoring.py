"""Answer log-likelihoods from the resident model: the self-check's scorer without a second copy of the base model.

Same semantics as ``generator.selfcheck.LoraModelScorer`` (right-padded ``pad_pairs`` batches, mean log-probability
per answer token, ``generator.batching.answer_logprobs``), computed by the engine's own model with every row on the
adapter's slot (or on no slot for the base model). Runs on the engine thread between decode steps, like the hidden
states of ``hidden.py``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from transformers import PreTrainedModel

from generator.batching import EncodedPair, PaddedBatch, answer_logprobs, pad_pairs
from service.engine.errors import NoFreeSlot
from service.engine.lora_layers import LoraBank, PreparedAdapter

LoadNow = Callable[[PreparedAdapter], int]
Submit = Callable[[Callable[[], torch.Tensor]], Future[torch.Tensor]]


def score_batch(
    model: PreTrainedModel, bank: LoraBank, load_now: LoadNow, batch: PaddedBatch, adapter: PreparedAdapter | None
) -> torch.Tensor:
    """On the engine thread: [N] mean log-probability per answer token, fp32 on the CPU."""
    device = bank.device
    if adapter is None:
        bank.activate(None)
    else:
        slot = load_now(adapter)  # resident and unpinned; nothing else runs on this thread until we return
        bank.activate([slot] * batch.input_ids.shape[0])
    with torch.inference_mode():
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
        ).logits
    total, count = answer_logprobs(logits, batch.labels.to(device))
    return (total / count.clamp_min(1)).to("cpu", torch.float32)


def score_pairs(
    submit: Submit,
    model: PreTrainedModel,
    bank: LoraBank,
    load_now: LoadNow,
    pairs: Sequence[EncodedPair],
    adapter: PreparedAdapter | None,
    pad_id: int,
    batch_size: int = 16,
    slot_wait_s: float = 30.0,
) -> torch.Tensor:
    """Batches of ``batch_size`` pairs, each one call on the engine thread. When every slot is pinned by running
    requests the call is retried until one frees up (``NoFreeSlot`` after ``slot_wait_s``)."""
    if not pairs:
        raise ValueError("no pairs to score")
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pad_pairs(pairs[start : start + batch_size], pad_id)
        deadline = time.monotonic() + slot_wait_s
        while True:
            try:
                out.append(submit(functools.partial(score_batch, model, bank, load_now, batch, adapter)).result())
                break
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    return torch.cat(out)
