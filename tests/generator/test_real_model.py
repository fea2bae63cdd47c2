"""The packaged SmolLM2-135M-Instruct: loading, caching, LoRA layout and the PEFT round trip on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import default_data_dir, ensure_smollm2_folder, load_base_model
from generator.config import LoraSettings, TaskEncoderSettings
from generator.lora_layout import LoraLayout
from generator.lora_model import LoraModel
from generator.task_encoder import TaskEncoder
from generator.tasks import Example, TaskSpec

pytestmark = pytest.mark.slow


def test_packaged_model_is_cached_as_a_plain_folder() -> None:
    folder = ensure_smollm2_folder(default_data_dir())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    base = load_base_model("smollm2-135m")
    assert base.name == "smollm2-135m" and base.tokenizer.pad_token is not None
    ids = base.tokenizer("The capital of France is", return_tensors="pt")
    out = base.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in base.tokenizer.decode(out[0])


def test_real_model_adapter_round_trip_with_peft(tmp_path: Path) -> None:
    base = load_base_model("smollm2-135m")
    settings = LoraSettings()
    layout = LoraLayout.from_model(base.model, settings)
    assert layout.dim == 30 * (4 * 576 + 576 * 4 + 4 * 576 + 192 * 4)
    vector = torch.randn(layout.dim, generator=torch.Generator().manual_seed(0)) * 0.02
    adapter = GeneratedAdapter(layout.unflatten(vector), settings, base.name, "real")
    adapter.save_peft(tmp_path)
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, TaskEncoderSettings())
    vector_parts = encoder.encode(TaskSpec("Translate to French.", (Example("cat", "chat"),)))
    assert vector_parts.in_context is not None and vector_parts.in_context.shape == (576,)
    ids = base.tokenizer("Input: cat\nOutput:", return_tensors="pt")["input_ids"]
    ours = LoraModel(base.model, settings)
    ours.load_tensors(adapter.tensors)
    plain = PeftModel.from_pretrained(load_base_model("smollm2-135m").model, str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(ours.model(ids).logits, plain(ids).logits, atol=1e-4)
