from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.adapter import AdapterIntegrityError, GeneratedAdapter, adapter_id, tensors_sha256
from generator.base_model import BaseModel, load_base_model
from generator.config import LoraSettings, TaskEncoderSettings
from generator.lora_layout import LoraLayout
from generator.lora_model import LoraModel
from generator.task_encoder import TaskEncoder
from generator.tasks import Example, TaskSpec


def _adapter(base: BaseModel, seed: int = 0) -> GeneratedAdapter:
    layout = LoraLayout.from_model(base.model, LoraSettings())
    vector = torch.randn(layout.dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    return GeneratedAdapter(layout.unflatten(vector), LoraSettings(), base.name, f"id{seed}", {"generator_id": "g"})


def test_adapter_id_is_a_content_address() -> None:
    spec = TaskSpec("Do x.", (Example("a", "b"),))
    assert adapter_id("g1", spec, None) == adapter_id("g1", TaskSpec(" Do x. ", (Example("a", "b"),)), None)
    assert len({adapter_id("g1", spec, None), adapter_id("g2", spec, None), adapter_id("g1", spec, 0)}) == 3


def test_adapter_id_names_the_read_precision_except_fp32(tiny_base: BaseModel) -> None:
    """bf16 and fp32 replicas on one Redis read different hidden states, so their adapters get different ids; fp32
    ids are unchanged (no precision key), so existing caches stay valid."""
    spec = TaskSpec("Do x.", (Example("a", "b"),))
    assert adapter_id("g1", spec, None, "float32") == adapter_id("g1", spec, None)
    assert adapter_id("g1", spec, None, "bfloat16") != adapter_id("g1", spec, None)
    settings = TaskEncoderSettings()
    assert TaskEncoder.for_model(tiny_base.model, tiny_base.tokenizer, settings).precision == "float32"
    half = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    assert TaskEncoder.for_model(half, tiny_base.tokenizer, settings).precision == "bfloat16"


def test_safetensors_round_trip(tiny_base: BaseModel) -> None:
    adapter = _adapter(tiny_base)
    data = adapter.to_safetensors_bytes()
    back = GeneratedAdapter.from_safetensors_bytes(data, expected_id="id0")
    assert back.adapter_id == "id0" and back.lora == adapter.lora and back.metadata == {"generator_id": "g"}
    assert tensors_sha256(back.tensors) == adapter.sha256


def test_tampered_bytes_are_refused(tiny_base: BaseModel) -> None:
    data = bytearray(_adapter(tiny_base).to_safetensors_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's data
    with pytest.raises(AdapterIntegrityError, match="checksum"):
        GeneratedAdapter.from_safetensors_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="not a valid safetensors"):
        GeneratedAdapter.from_safetensors_bytes(b"\x80\x04pickle-looking bytes")
    with pytest.raises(AdapterIntegrityError):
        GeneratedAdapter.from_safetensors_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AdapterIntegrityError, match="expected"):
        GeneratedAdapter.from_safetensors_bytes(_adapter(tiny_base).to_safetensors_bytes(), expected_id="other")


def test_peft_folder_loads_with_plain_peft_and_gives_same_logits(tiny_base: BaseModel, tmp_path: Path) -> None:
    adapter = _adapter(tiny_base)
    adapter.save_peft(tmp_path / "adapter")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        base_logits = tiny_base.model(ids).logits
        ours = LoraModel(tiny_base.model, adapter.lora)
        ours.load_tensors(adapter.tensors)
        our_logits = ours.model(ids).logits
    plain = PeftModel.from_pretrained(load_base_model("tiny").model, str(tmp_path / "adapter"))
    with torch.no_grad():
        peft_logits = plain(ids).logits
    assert torch.allclose(our_logits, peft_logits, atol=1e-5)
    assert not torch.allclose(base_logits, peft_logits, atol=1e-3), "the adapter must change the model"


def test_zip_holds_the_peft_folder(tiny_base: BaseModel, tmp_path: Path) -> None:
    adapter = _adapter(tiny_base)
    blob = adapter.to_peft_zip()
    assert blob == adapter.to_peft_zip(), "zips are deterministic"
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads(archive.read("adapter_config.json"))
        archive.extractall(tmp_path)
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    PeftModel.from_pretrained(load_base_model("tiny").model, str(tmp_path))
