"""Generator checkpoints: ``generator.safetensors`` (every tensor) + ``generator.json`` (everything else).

The JSON records the SHA-256 of the safetensors file; loading refuses a file that does not match, a tensor that is
missing or unexpected, and a format it does not know. Nothing is ever unpickled. The checkpoint's ``generator_id``
is a hash of both files' contents: adapter ids are derived from it, so a new generator never reuses old ids.

A training run saves everything in fp32. ``save_checkpoint(..., packed=True)`` writes the form that ships in the
package (``icm-lora export-generator``): the CVAE's decoder alone (the encoder only serves reconstruction training)
with its weights in fp16, upcast to fp32 when loaded; the statistics stay fp32. ``weights="int8"`` or ``"int4"``
stores each decoder matrix of at least ``QUANTIZE_MIN`` values group-wise quantised (``generator.quantize``) and the
normalisation mean in int8 (it is added to every generated value, so it keeps 8 bits); small tensors stay fp16 and
the normalisation scale (one per LoRA matrix) fp32. Loading dequantises to fp32 once. The JSON says what was done
(``"packed"``).
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
from generator.quantize import GROUP, WEIGHT_FORMATS, Quantized, dequantize, quantize
from generator.task_encoder import ConditionStats

FORMAT = "icm-lora-generator/1"
PACKED_DTYPE = torch.float16
ENCODER_PREFIXES = ("enc_chunk.", "enc_out.")
SHIPPED_WEIGHTS = "int4"  # what ``icm-lora export-generator`` writes unless told otherwise
QUANTIZE_MIN = 16384  # values: smaller tensors (biases, embeddings) stay fp16 when the rest is quantised
QDATA, QSCALE = "qdata:", "qscale:"  # prefixes of a quantised tensor's integers and scales
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

    def tensors(self, packed: bool = False, weights: str = "float16") -> dict[str, torch.Tensor]:
        """Every tensor to save; ``packed``: the decoder's weights only, in fp16, or with ``weights`` int8/int4 the
        large ones quantised (``quantization_bits``)."""
        if packed:
            plain, plan = self._packed_tensors(), self.quantization_bits(weights)
        else:
            plain = {f"cvae.{k}": v for k, v in self.cvae.state_dict().items()} | {"norm.mean": self.norm.mean}
            plan = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, value in plain.items():
            if name in plan:
                q = quantize(value, plan[name])
                tensors[QDATA + name], tensors[QSCALE + name] = q.data, q.scale
            else:
                tensors[name] = value.to(PACKED_DTYPE) if packed and name.startswith("cvae.") else value
        tensors["norm.scale"] = self.norm.scale
        tensors.update(self.cond.tensors())
        return {k: v.contiguous() for k, v in tensors.items()}

    def _packed_tensors(self) -> dict[str, torch.Tensor]:
        """The decoder's tensors and the normalisation mean, by their names in the file."""
        state = self.cvae.state_dict()
        return {f"cvae.{k}": v for k, v in state.items() if not k.startswith(ENCODER_PREFIXES)} | {
            "norm.mean": self.norm.mean
        }

    def quantization_bits(self, weights: str) -> dict[str, int]:
        """Which tensors the packed form stores quantised, with their bits: with int8/int4 ``weights``, every decoder
        matrix of at least ``QUANTIZE_MIN`` values, and the normalisation mean in 8 bits; none for float16."""
        bits = _bits(weights)
        if not bits:
            return {}
        return {
            name: 8 if name == "norm.mean" else bits
            for name, value in self._packed_tensors().items()
            if name == "norm.mean" or value.numel() >= QUANTIZE_MIN
        }

    def quantized_names(self, weights: str) -> dict[str, dict[str, Any]]:
        """For the JSON: each quantised tensor's name, shape and bits."""
        tensors = self._packed_tensors()
        return {
            name: {"shape": list(tensors[name].shape), "bits": bits}
            for name, bits in self.quantization_bits(weights).items()
        }

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

    def nbytes(self, packed: bool = False, weights: str = "float16") -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(packed, weights).values())


def _bits(weights: str) -> int:
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"unknown weight format {weights!r} (one of {', '.join(WEIGHT_FORMATS)})")
    return {"float16": 0, "int8": 8, "int4": 4}[weights]


def save_checkpoint(
    checkpoint: GeneratorCheckpoint, folder: Path, packed: bool = False, weights: str = "float16"
) -> str:
    """Write both files (atomically each); return and set the generator id. ``packed``: the shipping form, its large
    decoder matrices in ``weights`` (float16, int8 or int4)."""
    weights_bytes = save(checkpoint.tensors(packed, weights), metadata={"format": FORMAT})
    config = checkpoint.config()
    if packed:
        config["packed"] = {"cvae_dtype": str(PACKED_DTYPE).removeprefix("torch."), "decoder_only": True}
        if weights != "float16":
            config["packed"]["quantized"] = {"group": GROUP, "tensors": checkpoint.quantized_names(weights)}
    config["weights_sha256"] = hashlib.sha256(weights_bytes).hexdigest()
    checkpoint.generator_id = _generator_id(config)
    config["generator_id"] = checkpoint.generator_id
    write_atomic(folder / WEIGHTS_FILE, weights_bytes)
    write_json(folder / CONFIG_FILE, config)
    return checkpoint.generator_id


def _generator_id(config: dict[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "generator_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _dequantized(tensors: dict[str, torch.Tensor], packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The stored tensors with each quantised one (listed in the JSON) decoded to fp32 under its own name; an entry
    whose integers or scales are missing or do not fit its shape raises ``ValueError``."""
    quantized = packed.get("quantized")
    if not quantized:
        return tensors
    group, out = int(quantized["group"]), dict(tensors)
    for name, entry in dict(quantized["tensors"]).items():
        data, scale = out.pop(QDATA + name, None), out.pop(QSCALE + name, None)
        if data is None or scale is None:
            raise ValueError(f"quantised tensor {name} is missing")
        out[name] = dequantize(Quantized(data, scale), tuple(int(n) for n in entry["shape"]), int(entry["bits"]), group)
    return out


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
        tensors = _dequantized(load(weights), config.get("packed") or {})
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
