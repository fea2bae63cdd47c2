"""Hidden states of the resident base model (no adapter) for the task encoder.

Same semantics and the same batches as ``generator.task_encoder.ModelHiddenStateReader`` (``read_batches``: BOS + the
text's tokens cut from the left to ``max_length``, right padding, at most ``budget`` padded tokens per forward pass;
the chosen layer's hidden state at each text's last token), computed by the engine's own model so that only one copy
of the base model lives in memory. Each batch is one call on the engine thread, the next one submitted when it has
returned, so running streams take a decode step between two batches of a long read.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from generator.task_encoder import READ_TOKENS, ReadBatch, read_batch, read_batches, resolve_layer
from service.engine.lora_layers import LoraBank


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
        budget: int = READ_TOKENS,
    ) -> None:
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.layer = resolve_layer(layer, int(model.config.num_hidden_layers))
        self.max_length = max_length
        self.budget = budget
        self._submit = submit
        self._model = model
        self._tokenizer = tokenizer
        self._bank = bank
        self._encode_lock = encode_lock or threading.Lock()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        with self._encode_lock:
            batches = read_batches(self._tokenizer, texts, self.max_length, self.budget)
        return torch.cat([self._submit(functools.partial(self._read, b)).result() for b in batches])

    def _read(self, batch: ReadBatch) -> torch.Tensor:
        """On the engine thread: [rows, hidden] fp32 on the CPU; only the decoder runs, every slot off."""
        self._bank.activate(None)
        return read_batch(self._model.base_model, batch, self.layer)
