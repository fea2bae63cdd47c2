"""GeneratedAdapter: LoRA tensors under PEFT keys, their config, and their identity.

Serialised only as safetensors (never pickle). The safetensors header carries a SHA-256 of the tensor contents, so
bytes coming back from a cache are verified before use; ``from_safetensors_bytes`` refuses anything that does not
match.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from generator.base_model import hub_name
from generator.config import LoraSettings
from generator.files import write_atomic
from generator.lora_model import peft_lora_config
from generator.tasks import TaskSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "icm-lora-adapter/1"


class AdapterIntegrityError(ValueError):
    """Adapter bytes are not valid safetensors, or their checksum does not match their contents."""


def adapter_id(
    generator_id: str, spec: TaskSpec, seed: int | None, precision: str = "float32", condition: str | None = None
) -> str:
    """Content address of a generated adapter: the same (generator, spec, seed, precision) always gives the same id.

    ``precision`` is the dtype the task vector was read in. Reads in bf16 and fp32 give different hidden states and
    so different adapter bytes: replicas of different precisions on one Redis must not share an id. fp32 leaves the
    id as it always was (the key is added only for other precisions). The device is not part of the id: fp32 on a
    CPU and on a GPU agree to float rounding, not bit for bit, and a fleet that mixes them shares adapters, whichever
    replica made one first (``tensors_sha256`` names its bytes). ``condition``: set when the generator was conditioned
    on part of the spec only (``AdapterGenerator``'s ``condition="examples"`` on a spec with examples), so the two
    conditionings of one spec never share an id."""
    fields: dict[str, object] = {"generator": generator_id, "spec": spec.canonical_json(), "seed": seed}
    if precision != "float32":
        fields["precision"] = precision
    if condition is not None:
        fields["condition"] = condition
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum over keys, dtypes, shapes and raw bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class GeneratedAdapter:
    tensors: dict[str, torch.Tensor]
    lora: LoraSettings
    base_model: str
    adapter_id: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return tensors_sha256(self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def peft_config_dict(self) -> dict[str, object]:
        config = peft_lora_config(self.lora).to_dict()
        config["base_model_name_or_path"] = hub_name(self.base_model)
        config["target_modules"] = sorted(self.lora.target_modules)
        return json.loads(json.dumps(config, default=_json_default))

    def to_safetensors_bytes(self) -> bytes:
        header = {
            "format": FORMAT,
            "adapter_id": self.adapter_id,
            "base_model": self.base_model,
            "lora": json.dumps(self.lora.to_dict(), sort_keys=True),
            "sha256": self.sha256,
            **{f"meta.{k}": v for k, v in self.metadata.items()},
        }
        return deterministic_safetensors(self.tensors, header)

    @classmethod
    def from_safetensors_bytes(cls, data: bytes, expected_id: str | None = None) -> GeneratedAdapter:
        """Parse and verify; raises ``AdapterIntegrityError`` on any mismatch."""
        try:
            tensors = load(data)
            header = _read_header(data)
        except (SafetensorError, ValueError, KeyError) as exc:
            raise AdapterIntegrityError(f"not a valid safetensors adapter: {exc}") from None
        if header.get("format") != FORMAT:
            raise AdapterIntegrityError("not an icm-lora adapter (format tag missing)")
        if tensors_sha256(tensors) != header.get("sha256"):
            raise AdapterIntegrityError("adapter checksum does not match its tensors")
        if expected_id is not None and header.get("adapter_id") != expected_id:
            raise AdapterIntegrityError(f"adapter id {header.get('adapter_id')!r} is not the expected {expected_id!r}")
        try:
            lora = LoraSettings.from_dict(json.loads(header["lora"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterIntegrityError(f"adapter header has no valid LoRA settings: {exc}") from None
        metadata = {k.removeprefix("meta."): v for k, v in header.items() if k.startswith("meta.")}
        return cls(tensors, lora, header.get("base_model", ""), header["adapter_id"], metadata)

    def save_peft(self, folder: Path) -> Path:
        """Write a PEFT adapter folder that ``PeftModel.from_pretrained(base, folder)`` loads unchanged."""
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / ADAPTER_CONFIG, json.dumps(self.peft_config_dict(), indent=2).encode())
        write_atomic(folder / ADAPTER_WEIGHTS, self.to_safetensors_bytes())
        return folder

    def to_peft_zip(self) -> bytes:
        """The PEFT folder's two files as a zip archive (deterministic: fixed timestamps). The weights are stored, not
        deflated: float weights shrink by about 8% for about 55 ms of CPU per adapter (SmolLM2, r 4), paid by every
        first download and metadata request."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, payload in (
                (ADAPTER_CONFIG, json.dumps(self.peft_config_dict(), indent=2).encode()),
                (ADAPTER_WEIGHTS, self.to_safetensors_bytes()),
            ):
                info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if name == ADAPTER_CONFIG else zipfile.ZIP_STORED
                archive.writestr(info, payload)
        return buffer.getvalue()


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Standard safetensors bytes, but byte-identical for identical inputs (sorted header, sorted tensors).

    ``safetensors.torch.save`` orders its header through a hash map, so the same adapter would serialise to
    different bytes each time; identical bytes make cache entries, zips and ETags reproducible.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {tensor.dtype} for {key}")
        blob = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs)


def _read_header(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("too short")
    length = int.from_bytes(data[:8], "little")
    if length <= 0 or 8 + length > len(data):
        raise ValueError("bad header length")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("bad metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)
