"""AdapterGenerator: TaskSpec (+ seed) -> GeneratedAdapter, deterministic for (checkpoint, spec, seed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.adapter import GeneratedAdapter, adapter_id
from generator.checkpoint import GeneratorCheckpoint, load_checkpoint
from generator.task_encoder import TaskEncoder, TaskVector
from generator.tasks import TaskSpec


class GeneratorMismatchError(ValueError):
    """The checkpoint was trained for another base model or LoRA layout than the one it is used with."""


@dataclass(frozen=True)
class GenerationTimings:
    encode_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.decode_s


CONDITIONS = ("both", "examples")


class AdapterGenerator:
    """``condition``: what a spec with examples conditions the generator on: ``both`` (its description and its
    examples) or ``examples`` (the examples alone; the description is still stored with the spec and used when there
    are no examples). For the shipped SmolLM2 generator, the examples alone did better where a task's description
    says less than its examples (bbq ``*_disambig``, whose description is that of the trained ``*_ambig`` tasks), and
    no worse elsewhere (README, "Examples over the description"); the service and ``icm-lora generate`` use it."""

    def __init__(self, checkpoint: GeneratorCheckpoint, encoder: TaskEncoder, condition: str = "both") -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
        if encoder.settings != checkpoint.encoder:
            raise GeneratorMismatchError("the task encoder's settings differ from those the generator was trained with")
        expected = checkpoint.cond.in_context_mean.numel()
        if encoder.hidden_size != expected:
            raise GeneratorMismatchError(
                f"the generator expects a base model with hidden size {expected}, the encoder has {encoder.hidden_size}"
            )
        self.checkpoint = checkpoint
        self.encoder = encoder
        self.condition = condition
        self.last_timings = GenerationTimings(0.0, 0.0)

    @classmethod
    def from_folder(cls, folder: Path, encoder: TaskEncoder) -> AdapterGenerator:
        return cls(load_checkpoint(folder), encoder)

    @property
    def generator_id(self) -> str:
        return self.checkpoint.generator_id

    def _examples_only(self, spec: TaskSpec) -> bool:
        """Whether this spec is conditioned on its examples alone (it has examples the encoder reads, and a
        description that would otherwise count)."""
        settings = self.encoder.settings
        return (
            self.condition == "examples"
            and bool(spec.examples)
            and settings.use_examples
            and settings.use_description
            and bool(spec.description.strip())
        )

    def adapter_id(self, spec: TaskSpec, seed: int | None = None) -> str:
        condition = "examples" if self._examples_only(spec) else None
        return adapter_id(self.generator_id, spec, seed, self.encoder.precision, condition)

    def encode(self, spec: TaskSpec) -> TaskVector:
        """The task vector this generator is conditioned on for ``spec`` (see ``condition``)."""
        if self._examples_only(spec):
            return TaskVector(None, self.encoder.in_context_vector(spec.examples[: self.encoder.settings.max_examples]))
        return self.encoder.encode(spec)

    def generate(self, spec: TaskSpec, seed: int | None = None) -> GeneratedAdapter:
        """``seed=None``: the deterministic adapter (z = 0). A seed draws z ~ N(0, I) from that seed."""
        start = time.perf_counter()
        vector = self.encode(spec)
        encoded = time.perf_counter()
        adapter = self.from_task_vector(vector, self.adapter_id(spec, seed), seed)
        self.last_timings = GenerationTimings(encoded - start, time.perf_counter() - encoded)
        return adapter

    @torch.inference_mode()
    def decode_vector(self, vector: TaskVector, seed: int | None = None) -> torch.Tensor:
        """Task vector -> de-normalised flat LoRA vector [D]."""
        cvae = self.checkpoint.cvae
        cond = self.checkpoint.cond.condition(vector).unsqueeze(0)
        z = torch.zeros(1, cvae.config.latent_dim)
        if seed is not None:
            z = torch.randn(1, cvae.config.latent_dim, generator=torch.Generator().manual_seed(seed))
        normalised = cvae.decode(z, cond)[0]
        return self.checkpoint.norm.denormalise(normalised)

    def from_task_vector(self, vector: TaskVector, identity: str, seed: int | None = None) -> GeneratedAdapter:
        flat = self.decode_vector(vector, seed)
        return GeneratedAdapter(
            tensors=self.checkpoint.layout.unflatten(flat),
            lora=self.checkpoint.layout.settings,
            base_model=self.checkpoint.base_model,
            adapter_id=identity,
            metadata={"generator_id": self.generator_id, "seed": "" if seed is None else str(seed)},
        )
