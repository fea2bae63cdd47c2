"""Generator checkpoints: ``generator.safetensors`` (every tensor) + ``generator.json`` (everything else).

The JSON records the SHA-256 of the safetensors file; loading refuses a file that does not match, a tensor that is
missing or unexpected, and a format it does not know. Nothing is ever unpickled. The checkpoint's ``generator_id``
is a hash of both files' contents: adapter ids are derived from it, so a new generator never reuses old ids.

A training run saves everything in fp32. ``save_checkpoint(..., packed=True)`` writes the form that ships in the
package (``icm-lora export-generator``): the CVAE's decoder alone (the encoder only serves reconstruction training)
with its weights in fp16, upcast to fp32 when loaded; the statistics stay fp32. The JSON says so (``"packed"``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from generator.config import CVAEConfig, LoraSettings, TaskEncoderSettings
from generator.cvae import CVAE
from generator.files import write_atomic, write_json
from generator.lora_layout import LoraLayout, NormStats, Segment
from generator.task_encoder import ConditionStats

FORMAT = "icm-lora-generator/1"
PACKED_DTYPE = torch.float16
ENCODER_PREFIXES = ("enc_chunk.", "enc_out.")
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "generator.json"


class CheckpointError(ValueError):
    """A generator checkpoint is missing, corrupted or of another format."""


@dataclass
class GeneratorCheckpoint:
    cvae: CVAE
    norm: NormStats
    cond: ConditionStats
    layout: LoraLayout
    encoder: TaskEncoderSettings
    base_model: str
    training_tasks: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    generator_id: str = ""

    def tensors(self, packed: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor to save; ``packed``: the decoder's weights only, in fp16."""
        state = self.cvae.state_dict()
        if packed:
            state = {k: v.to(PACKED_DTYPE) for k, v in state.items() if not k.startswith(ENCODER_PREFIXES)}
        tensors = {f"cvae.{k}": v.detach().contiguous() for k, v in state.items()}
        tensors["norm.mean"] = self.norm.mean.contiguous()
        tensors["norm.scale"] = self.norm.scale.contiguous()
        tensors.update({k: v.contiguous() for k, v in self.cond.tensors().items()})
        return tensors

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "cvae": self.cvae.config.to_dict(),
            "lora": self.layout.settings.to_dict(),
            "segments": [{"key": s.key, "shape": list(s.shape)} for s in self.layout.segments],
            "encoder": self.encoder.to_dict(),
            "training_tasks": self.training_tasks,
            "info": self.info,
        }

    def nbytes(self, packed: bool = False) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(packed).values())


def save_checkpoint(checkpoint: GeneratorCheckpoint, folder: Path, packed: bool = False) -> str:
    """Write both files (atomically each); return and set the generator id. ``packed``: the shipping form."""
    weights = save(checkpoint.tensors(packed), metadata={"format": FORMAT})
    config = checkpoint.config()
    if packed:
        config["packed"] = {"cvae_dtype": str(PACKED_DTYPE).removeprefix("torch."), "decoder_only": True}
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    checkpoint.generator_id = _generator_id(config)
    config["generator_id"] = checkpoint.generator_id
    write_atomic(folder / WEIGHTS_FILE, weights)
    write_json(folder / CONFIG_FILE, config)
    return checkpoint.generator_id


def _generator_id(config: dict[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "generator_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(folder: Path) -> GeneratorCheckpoint:
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder}: no generator checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_path}: unknown checkpoint format {config.get('format') if isinstance(config, dict) else None!r}"
        )
    weights = weights_path.read_bytes()
    if hashlib.sha256(weights).hexdigest() != config.get("weights_sha256"):
        raise CheckpointError(f"{weights_path}: checksum does not match {CONFIG_FILE} (corrupted or swapped file)")
    if config.get("generator_id") != _generator_id(config):
        raise CheckpointError(f"{config_path}: generator_id does not match the checkpoint's contents")
    try:
        tensors = load(weights)
        settings = LoraSettings.from_dict(config["lora"])
        segments, offset = [], 0
        for item in config["segments"]:
            segment = Segment(item["key"], (int(item["shape"][0]), int(item["shape"][1])), offset)
            segments.append(segment)
            offset = segment.end
        layout = LoraLayout(settings, tuple(segments))
        cvae_config = CVAEConfig.from_dict(config["cvae"])
        encoder = TaskEncoderSettings.from_dict(config["encoder"])
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: malformed checkpoint ({exc})") from None
    if cvae_config.lora_dim != layout.dim:
        raise CheckpointError(f"{folder}: CVAE size {cvae_config.lora_dim} does not match the layout {layout.dim}")
    packed = bool(config.get("packed"))
    cvae = CVAE(cvae_config, with_encoder=not packed)
    state = {k.removeprefix("cvae."): v.float() for k, v in tensors.items() if k.startswith("cvae.")}
    try:
        cvae.load_state_dict(state, strict=True)
        norm = NormStats(tensors["norm.mean"], tensors["norm.scale"], layout.segment_ids())
        cond = ConditionStats.from_tensors(tensors)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: tensors do not match the configuration ({exc})") from None
    expected = len(state) + 2 + len(cond.tensors())
    if expected != len(tensors):
        raise CheckpointError(f"{folder}: unexpected tensors in the checkpoint")
    if norm.mean.numel() != layout.dim or norm.scale.numel() != len(layout.segments):
        raise CheckpointError(f"{folder}: normalisation statistics do not match the layout")
    if cond.dim != cvae_config.cond_dim:
        raise CheckpointError(f"{folder}: condition size does not match the CVAE")
    cvae.eval()
    return GeneratorCheckpoint(
        cvae=cvae,
        norm=norm,
        cond=cond,
        layout=layout,
        encoder=encoder,
        base_model=str(config["base_model"]),
        training_tasks=list(config.get("training_tasks", [])),
        info=dict(config.get("info", {})),
        generator_id=str(config["generator_id"]),
    )
