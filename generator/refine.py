"""Refinement: a few gradient steps on a task's own examples, starting from its generated adapter.

The generated adapter is a starting point that already knows the task's family and answer format; a few steps on
the spec's examples make it fit this task. The same function trains "a LoRA from the standard initialisation with
the same steps and examples" (``start=None``), the baseline that refinement has to beat. Deterministic for the same
inputs (the example order is seeded by ``seed``), so a refined adapter is reproducible and content-addressable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from generator.config import ConfigError, LoraTrainingSettings
from generator.lora_model import LoraModel
from generator.tasks import TaskSpec
from generator.training.train_loras import encode_examples, train_lora

MAX_REFINE_STEPS = 64


@dataclass(frozen=True)
class RefineSettings:
    steps: int = 32
    learning_rate: float = 3e-3
    batch_size: int = 8
    max_length: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_REFINE_STEPS:
            raise ConfigError(f"refine steps must be in [1, {MAX_REFINE_STEPS}], got {self.steps}")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 8:
            raise ConfigError("refine learning_rate must be positive, batch_size >= 1, max_length >= 8")

    def training(self) -> LoraTrainingSettings:
        return LoraTrainingSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            checkpoints=1,
            checkpoint_every=1,
            data_seed=self.seed,
            end_token=True,
        )

    def key(self) -> str:
        """Stable text of the settings, for content addresses of refined adapters."""
        return json.dumps(
            {
                "steps": self.steps,
                "lr": self.learning_rate,
                "batch": self.batch_size,
                "len": self.max_length,
                "seed": self.seed,
            },
            sort_keys=True,
        )


def refined_adapter_id(parent_id: str, settings: RefineSettings) -> str:
    """Content address of the adapter refined from ``parent_id`` with ``settings``."""
    return hashlib.sha256(f"refine|{parent_id}|{settings.key()}".encode()).hexdigest()[:32]


def refine(
    lora: LoraModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    settings: RefineSettings,
    start: torch.Tensor | None,
) -> torch.Tensor:
    """The flat LoRA vector after ``settings.steps`` steps on ``spec.examples`` from ``start`` (None: the LoRA's
    standard initialisation). Raises ``ValueError`` for a spec without examples."""
    if not spec.examples:
        raise ValueError("refinement needs examples")
    pairs = encode_examples(tokenizer, spec.examples, settings.max_length, end=True)
    pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
    trained = train_lora(lora, pad_id, pairs, settings.training(), name="refine", start=start)
    return trained.checkpoints[-1]
