"""Where a LoRA's numbers live: target modules and shapes <-> one flat vector, PEFT key names, normalisation.

The order of the flat vector is fixed by the layout: layers in model order, target modules in configured order, then
A before B. Every LoRA matrix is one *segment* (and one CVAE chunk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from generator.config import LoraSettings


class LayoutError(ValueError):
    """Tensors do not match the layout (missing key, wrong shape, wrong vector length)."""


@dataclass(frozen=True)
class Segment:
    """One LoRA matrix: its PEFT key in a saved adapter, its shape, and its slice of the flat vector."""

    key: str
    shape: tuple[int, int]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def end(self) -> int:
        return self.offset + self.size


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def fused_projection_hint(model: nn.Module) -> str:
    """A hint for models whose attention projections are fused (Phi-3's ``qkv_proj``), else empty."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "qkv_proj" in leaves and "q_proj" not in leaves:
        return (
            "; this model fuses its attention projections into qkv_proj (Phi-3): "
            'set lora.target_modules to ["qkv_proj"] (and train a generator for it)'
        )
    return ""


@dataclass(frozen=True)
class LoraLayout:
    settings: LoraSettings
    segments: tuple[Segment, ...]

    @classmethod
    def from_model(cls, model: nn.Module, settings: LoraSettings) -> LoraLayout:
        """Find every ``nn.Linear`` whose name ends with a target module name, in model order."""
        found: dict[str, list[tuple[str, nn.Linear]]] = {name: [] for name in settings.target_modules}
        for module_name, module in model.named_modules():
            leaf = module_name.rsplit(".", 1)[-1]
            if leaf in found and isinstance(module, nn.Linear):
                found[leaf].append((module_name, module))
        missing = [name for name, hits in found.items() if not hits]
        if missing:
            raise LayoutError(f"target modules {missing} not found in the model{fused_projection_hint(model)}")
        modules = sorted(
            (pair for hits in found.values() for pair in hits),
            key=lambda pair: (_layer_of(pair[0]), settings.target_modules.index(pair[0].rsplit(".", 1)[-1])),
        )
        segments: list[Segment] = []
        offset = 0
        for module_name, linear in modules:
            prefix = f"base_model.model.{module_name}"
            for key, shape in (
                (f"{prefix}.lora_A.weight", (settings.rank, linear.in_features)),
                (f"{prefix}.lora_B.weight", (linear.out_features, settings.rank)),
            ):
                segments.append(Segment(key, shape, offset))
                offset += shape[0] * shape[1]
        return cls(settings=settings, segments=tuple(segments))

    @property
    def dim(self) -> int:
        return self.segments[-1].end

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.segments]

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        return tuple(s.size for s in self.segments)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """PEFT-keyed tensors -> one fp32 vector. Extra keys are an error: they would be silently dropped."""
        extra = set(tensors) - set(self.keys)
        if extra:
            raise LayoutError(f"tensors not in the layout: {sorted(extra)[:3]}")
        parts = []
        for segment in self.segments:
            if segment.key not in tensors:
                raise LayoutError(f"missing LoRA tensor {segment.key}")
            tensor = tensors[segment.key]
            if tuple(tensor.shape) != segment.shape:
                raise LayoutError(f"{segment.key}: shape {tuple(tensor.shape)}, layout wants {segment.shape}")
            parts.append(tensor.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """One vector -> PEFT-keyed tensors (contiguous copies, safe to save)."""
        if vector.ndim != 1 or vector.numel() != self.dim:
            raise LayoutError(f"expected a vector of {self.dim} numbers, got shape {tuple(vector.shape)}")
        return {s.key: vector[s.offset : s.end].reshape(s.shape).clone().contiguous() for s in self.segments}

    def segment_ids(self) -> torch.Tensor:
        """For each position of the flat vector, the index of its segment."""
        return torch.repeat_interleave(torch.arange(len(self.segments)), torch.tensor(self.chunk_sizes))


def _layer_of(module_name: str) -> int:
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else -1


@dataclass(frozen=True)
class NormStats:
    """Normalisation fitted on the training collection, never on the task being generated.

    ``mean`` is element-wise (it anchors the shared LoRA initialisation and what all tasks learn alike); ``scale`` is
    one number per segment (the spread of the residuals), broadcast over the segment.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    segment_ids: torch.Tensor

    @classmethod
    def fit(cls, vectors: torch.Tensor, layout: LoraLayout, min_scale: float = 1e-6) -> NormStats:
        if vectors.ndim != 2 or vectors.shape[1] != layout.dim:
            raise LayoutError(f"expected [N, {layout.dim}] vectors, got {tuple(vectors.shape)}")
        mean = vectors.mean(dim=0)
        residual = vectors - mean
        seg = layout.segment_ids()
        scale = torch.stack([residual[:, s.offset : s.end].pow(2).mean().sqrt() for s in layout.segments])
        return cls(mean=mean, scale=scale.clamp_min(min_scale), segment_ids=seg)

    @classmethod
    def at_init(cls, init: torch.Tensor, layout: LoraLayout, a_scale: float = 0.1, b_scale: float = 0.01) -> NormStats:
        """For a generator trained end to end from scratch (no collection): centred on the LoRA initialisation (so an
        output of zeros is the untrained LoRA, i.e. the base model), A segments scaled to ``a_scale`` times the spread
        of their initial values, B segments (zero at init) to ``b_scale``."""
        if init.ndim != 1 or init.numel() != layout.dim:
            raise LayoutError(f"expected a [{layout.dim}] init vector, got {tuple(init.shape)}")
        scale = []
        for s in layout.segments:
            values = init[s.offset : s.end]
            spread = float(values.std()) if s.key.endswith("lora_A.weight") else 0.0
            scale.append(a_scale * spread if spread > 0 else b_scale)
        return cls(mean=init.clone(), scale=torch.tensor(scale), segment_ids=layout.segment_ids())

    def _expanded_scale(self) -> torch.Tensor:
        return self.scale[self.segment_ids]

    def normalise(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean) / self._expanded_scale()

    def denormalise(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self._expanded_scale() + self.mean
