"""Hidden states of the resident base model (no adapter) for the task encoder.

Same semantics as ``generator.task_encoder.ModelHiddenStateReader`` (BOS + the text's tokens cut from the left to
``max_length``, right padding, the chosen layer's hidden state at each text's last token), computed by the engine's
own model so that only one copy of the base model lives in memory. Runs on the engine thread between decode steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from generator.task_encoder import hidden_states_at
from service.engine.lora_layers import LoraBank


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """``None``: the middle layer; negative: counted from the end (as ``ModelHiddenStateReader``)."""
    index = num_layers // 2 if layer is None else (layer if layer >= 0 else num_layers + 1 + layer)
    if not 0 <= index <= num_layers:
        raise ValueError(f"hidden layer {layer} is outside the model's 0..{num_layers}")
    return index


def tokenize_for_reader(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, each text as BOS + its last ``max_length - 1`` tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(t, add_special_tokens=False)["input_ids"][-(max_length - len(bos)) :] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def read_hidden_states(
    model: PreTrainedModel, bank: LoraBank, ids: torch.Tensor, mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """[N, hidden] fp32 on the CPU. Only the decoder runs (no logits); every LoRA slot is off."""
    device = bank.device
    ids, mask = ids.to(device), mask.to(device)
    bank.activate(None)
    with torch.inference_mode():
        hidden = hidden_states_at(model.base_model, ids, mask, layer)
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(ids.shape[0], device=device), last].to("cpu", torch.float32)


class EngineHiddenStateReader:
    """A ``HiddenStateReader`` (texts -> [N, hidden]) served by the engine."""

    def __init__(
        self,
        submit: Callable[[Callable[[], torch.Tensor]], Future[torch.Tensor]],
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        bank: LoraBank,
        layer: int | None,
        max_length: int,
        encode_lock: threading.Lock | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.layer = resolve_layer(layer, int(model.config.num_hidden_layers))
        self.max_length = max_length
        self._submit = submit
        self._model = model
        self._tokenizer = tokenizer
        self._bank = bank
        self._encode_lock = encode_lock or threading.Lock()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            raise ValueError("no texts to read")
        with self._encode_lock:
            ids, mask = tokenize_for_reader(self._tokenizer, texts, self.max_length)
        future = self._submit(lambda: read_hidden_states(self._model, self._bank, ids, mask, self.layer))
        return future.result()
