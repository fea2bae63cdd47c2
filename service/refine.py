"""Refinement: a few LoRA training steps on a task's own examples, starting from its generated adapter.

A refined adapter is a content address like any other: ``refined_adapter_id(parent, plan)`` hashes the generated
adapter's id and the refinement settings, and training is deterministic for the same inputs, so a refined adapter is
regenerated bit-identically after a cache loss (its durable spec is the parent's spec + seed + the plan).

Training never touches the engine's model (its Linears are slotted and it is serving): ``TrainingRefiner`` loads its
own copy of the base model on first use and wraps it once in a ``LoraModel``. It runs in a worker thread, one
refinement at a time, and stops at the next step once its ``stop`` event is set (service shutdown).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel, load_base_model
from generator.config import LoraSettings
from generator.device import CPU_FP32, Placement
from generator.lora_model import LoraModel
from generator.refine import RefinePlan
from generator.tasks import TaskSpec

REFINED_FROM = "refined_from"  # adapter metadata keys of a refined adapter
REFINE = "refine"


class RefinementCancelled(RuntimeError):
    """The service is shutting down; the refinement stopped between two steps."""


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

    def __init__(
        self, base_model: str, data_dir: Path | None, lora: LoraSettings, placement: Placement = CPU_FP32
    ) -> None:
        self.base_model = base_model
        self.data_dir = data_dir
        self.placement = placement
        self.lora_settings = lora
        self._lock = threading.Lock()
        self._loaded: tuple[BaseModel, LoraModel] | None = None

    def _load(self) -> tuple[BaseModel, LoraModel]:
        if self._loaded is None:
            base = load_base_model(self.base_model, self.data_dir, self.placement)
            # the init seed does not matter: training starts from the generated adapter's vector
            self._loaded = base, LoraModel(base.model, self.lora_settings, init_seed=0)
        return self._loaded

    def __call__(
        self, spec: TaskSpec, adapter: GeneratedAdapter, plan: RefinePlan, adapter_id: str, stop: threading.Event
    ) -> GeneratedAdapter:
        from generator.refine import refine  # the offline trainer, imported lazily

        if adapter.lora != self.lora_settings:
            raise ValueError(f"adapter {adapter.adapter_id!r} has LoRA settings {adapter.lora}, not the generator's")
        with self._lock:
            base, lora = self._load()
            start = lora.layout.flatten(adapter.tensors)
            vector = refine(lora, base.tokenizer, spec, plan, start, adapter.adapter_id, progress=_StopCheck(stop))
            tensors = lora.layout.unflatten(vector)
        metadata = {
            "generator_id": adapter.metadata.get("generator_id", ""),
            "seed": adapter.metadata.get("seed", ""),
            REFINED_FROM: adapter.adapter_id,
            REFINE: json.dumps(plan.to_dict(), sort_keys=True),
        }
        return GeneratedAdapter(tensors, adapter.lora, adapter.base_model, adapter_id, metadata)
