"""One prompt framing for icm-lora and vLLM: the model folder's tokenizer adds BOS to a plain prompt by default (as
icm-lora's completions and LoRA training do), and adapter configs name the base model as PEFT and vLLM know it."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from generator.adapter import GeneratedAdapter
from generator.base_model import build_tiny_tokenizer, frame_prompts_with_bos, hub_name
from generator.config import LoraSettings


def test_tokenizer_folder_frames_prompts_with_bos(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)("Input: kiwi\nOutput:")["input_ids"]
    assert plain[0] != tokenizer.bos_token_id

    assert frame_prompts_with_bos(tmp_path / "tokenizer.json") is True
    assert frame_prompts_with_bos(tmp_path / "tokenizer.json") is False  # once
    framed = AutoTokenizer.from_pretrained(tmp_path)
    assert framed("Input: kiwi\nOutput:")["input_ids"] == [tokenizer.bos_token_id, *plain]
    assert framed("Input: kiwi\nOutput:", add_special_tokens=False)["input_ids"] == plain  # what icm-lora calls


def test_adapter_config_names_the_hub_model() -> None:
    assert hub_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_name("/models/my-llama") == "/models/my-llama"
    adapter = GeneratedAdapter({}, LoraSettings(), "smollm2-135m", "x")
    config = json.loads(json.dumps(adapter.peft_config_dict()))
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert GeneratedAdapter.from_safetensors_bytes(adapter.to_safetensors_bytes()).base_model == "smollm2-135m"
