"""Refinement: a few LoRA training steps on a task's own examples, starting from its generated adapter.

A refined adapter is a content address like any other: ``refined_adapter_id(parent, plan)`` hashes the generated
adapter's id and the refinement settings, and training is deterministic for the same inputs, so a refined adapter is
regenerated bit-identically after a cache loss (its durable spec is the parent's spec + seed + the plan).

Training never touches the engine's model (its Linears are slotted and it is serving): ``TrainingRefiner`` loads its
own copy of the base model on first use and wraps it once in a ``LoraModel``. It runs in a worker thread, one
refinement at a time, and stops at the next step once its ``stop`` event is set (service shutdown).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel, load_base_model
from generator.config import LoraSettings, LoraTrainingSettings
from generator.lora_model import LoraModel
from generator.tasks import TaskSpec

MAX_REFINE_STEPS = 64
REFINED_FROM = "refined_from"  # adapter metadata keys of a refined adapter
REFINE = "refine"


class RefinementCancelled(RuntimeError):
    """The service is shutting down; the refinement stopped between two steps."""


@dataclass(frozen=True)
class RefinePlan:
    """Everything that shapes a refined adapter besides its parent. Part of the refined adapter's id."""

    steps: int
    learning_rate: float
    batch_size: int
    max_length: int = LoraTrainingSettings.max_length

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_REFINE_STEPS:
            raise ValueError(f"refinement steps must be in 1..{MAX_REFINE_STEPS}, got {self.steps}")

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


@dataclass(frozen=True)
class RefineOrigin:
    """Where a refined adapter comes from: stored with its spec so that it can be regenerated."""

    parent_id: str
    plan: RefinePlan

    def to_dict(self) -> dict[str, Any]:
        return {"parent": self.parent_id, "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefineOrigin:
        return cls(str(data["parent"]), RefinePlan.from_dict(data["plan"]))


def refined_adapter_id(parent_id: str, plan: RefinePlan) -> str:
    blob = json.dumps({"parent": parent_id, "refine": plan.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class Refiner(Protocol):
    """(spec, generated adapter, plan, id of the result, stop event) -> the refined adapter. Blocking; called from a
    worker thread, one call at a time."""

    def __call__(
        self, spec: TaskSpec, adapter: GeneratedAdapter, plan: RefinePlan, adapter_id: str, stop: threading.Event
    ) -> GeneratedAdapter: ...


class _StopCheck(tqdm):
    """A silent progress object whose ``update`` (called by ``train_lora`` after every step) raises once ``stop`` is
    set: the only hook into the training loop."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(disable=True)
        self._stop = stop

    def update(self, n: float | None = 1) -> bool | None:
        if self._stop.is_set():
            raise RefinementCancelled("the service is shutting down")
        return None

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        return None


class TrainingRefiner:
    """``train_lora(start=generated vector)`` on a private copy of the base model, loaded on first use."""

    def __init__(self, base_model: str, data_dir: Path | None, lora: LoraSettings) -> None:
        self.base_model = base_model
        self.data_dir = data_dir
        self.lora_settings = lora
        self._lock = threading.Lock()
        self._loaded: tuple[BaseModel, LoraModel] | None = None

    def _load(self) -> tuple[BaseModel, LoraModel]:
        if self._loaded is None:
            base = load_base_model(self.base_model, self.data_dir)
            # the init seed does not matter: training starts from the generated adapter's vector
            self._loaded = base, LoraModel(base.model, self.lora_settings, init_seed=0)
        return self._loaded

    def __call__(
        self, spec: TaskSpec, adapter: GeneratedAdapter, plan: RefinePlan, adapter_id: str, stop: threading.Event
    ) -> GeneratedAdapter:
        from generator.training.train_loras import encode_examples, train_lora  # the offline trainer, imported lazily

        if not spec.examples:
            raise ValueError("a task without examples cannot be refined")
        if adapter.lora != self.lora_settings:
            raise ValueError(f"adapter {adapter.adapter_id!r} has LoRA settings {adapter.lora}, not the generator's")
        with self._lock:
            base, lora = self._load()
            pad = base.tokenizer.pad_token_id
            if pad is None:
                pad = base.tokenizer.eos_token_id if base.tokenizer.eos_token_id is not None else 0
            pairs = encode_examples(base.tokenizer, spec.examples, plan.max_length, end=True)
            start = lora.layout.flatten(adapter.tensors)
            trained = train_lora(
                lora, int(pad), pairs, plan.training(), adapter.adapter_id, progress=_StopCheck(stop), start=start
            )
            tensors = lora.layout.unflatten(trained.checkpoints[-1])
        metadata = {
            "generator_id": adapter.metadata.get("generator_id", ""),
            "seed": adapter.metadata.get("seed", ""),
            REFINED_FROM: adapter.adapter_id,
            REFINE: json.dumps(plan.to_dict(), sort_keys=True),
        }
        return GeneratedAdapter(tensors, adapter.lora, adapter.base_model, adapter_id, metadata)
