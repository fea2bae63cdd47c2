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


class AdapterGenerator:
    def __init__(self, checkpoint: GeneratorCheckpoint, encoder: TaskEncoder) -> None:
        if encoder.settings != checkpoint.encoder:
            raise GeneratorMismatchError("the task encoder's settings differ from those the generator was trained with")
        expected = checkpoint.cond.in_context_mean.numel()
        if encoder.hidden_size != expected:
            raise GeneratorMismatchError(
                f"the generator expects a base model with hidden size {expected}, the encoder has {encoder.hidden_size}"
            )
        self.checkpoint = checkpoint
        self.encoder = encoder
        self.last_timings = GenerationTimings(0.0, 0.0)

    @classmethod
    def from_folder(cls, folder: Path, encoder: TaskEncoder) -> AdapterGenerator:
        return cls(load_checkpoint(folder), encoder)

    @property
    def generator_id(self) -> str:
        return self.checkpoint.generator_id

    def adapter_id(self, spec: TaskSpec, seed: int | None = None) -> str:
        return adapter_id(self.generator_id, spec, seed, self.encoder.precision)

    def generate(self, spec: TaskSpec, seed: int | None = None) -> GeneratedAdapter:
        """``seed=None``: the deterministic adapter (z = 0). A seed draws z ~ N(0, I) from that seed."""
        start = time.perf_counter()
        vector = self.encoder.encode(spec)
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
