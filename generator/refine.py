"""Refinement: a few gradient steps on a task's own examples, starting from its generated adapter.

The generated adapter is a starting point that already knows the task's family and answer format; a few steps on
the spec's examples make it fit this task. The same function trains "a LoRA from the standard initialisation with
the same steps and examples" (``start=None``), the baseline refinement has to beat in the quality report.
Deterministic for the same inputs (fixed example order), so a refined adapter is reproducible: its content address
``refined_adapter_id(parent, plan)`` hashes the generated adapter's id and the plan, and the service regenerates it
bit-identically after a cache loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from generator.config import ConfigError, LoraTrainingSettings
from generator.lora_model import LoraModel
from generator.tasks import TaskSpec
from generator.training.train_loras import encode_examples, train_lora

MAX_REFINE_STEPS = 64


@dataclass(frozen=True)
class RefinePlan:
    """Everything that shapes a refined adapter besides its parent (and so part of the refined adapter's id)."""

    steps: int
    learning_rate: float = 2e-3
    batch_size: int = 8
    max_length: int = LoraTrainingSettings.max_length

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_REFINE_STEPS:
            raise ConfigError(f"refinement steps must be in 1..{MAX_REFINE_STEPS}, got {self.steps}")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 8:
            raise ConfigError("refinement needs learning_rate > 0, batch_size >= 1 and max_length >= 8")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefinePlan:
        return cls(int(data["steps"]), float(data["learning_rate"]), int(data["batch_size"]), int(data["max_length"]))

    def training(self) -> LoraTrainingSettings:
        """LoRA training settings: answers end with EOS, one kept checkpoint (the last step), fixed data order."""
        return LoraTrainingSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            checkpoints=1,
            checkpoint_every=1,
            end_token=True,
        )


def refined_adapter_id(parent_id: str, plan: RefinePlan) -> str:
    """Content address of the adapter refined from ``parent_id`` with ``plan``."""
    blob = json.dumps({"parent": parent_id, "refine": plan.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def refine(
    lora: LoraModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    plan: RefinePlan,
    start: torch.Tensor | None,
    name: str = "refine",
    progress: tqdm | None = None,
) -> torch.Tensor:
    """The flat LoRA vector after ``plan.steps`` steps on ``spec.examples`` from ``start`` (None: the LoRA's standard
    initialisation). ``progress`` is updated after every step (a caller may stop training by raising from it)."""
    if not spec.examples:
        raise ValueError("a task without examples cannot be refined")
    pairs = encode_examples(tokenizer, spec.examples, plan.max_length, end=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trained = train_lora(lora, int(pad or 0), pairs, plan.training(), name, progress=progress, start=start)
    return trained.checkpoints[-1]
