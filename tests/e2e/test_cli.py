from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from typer.testing import CliRunner

from generator.adapter import ADAPTER_WEIGHTS, GeneratedAdapter
from generator.base_model import load_base_model
from generator.checkpoint import load_checkpoint
from generator.generate import AdapterGenerator
from generator.lora_model import LoraModel
from generator.task_encoder import TaskEncoder
from generator.tasks import TaskSpec
from icm_lora.cli import app

runner = CliRunner()


def test_generate_writes_a_peft_folder_equal_to_in_process_generation(small_run: Path, tmp_path: Path) -> None:
    spec = {
        "description": "Decide whether the words are fruits or animals.",
        "examples": [{"input": "kiwi pear lime", "output": "yes"}],
    }
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(spec))
    out = tmp_path / "adapter"
    result = runner.invoke(
        app, ["generate", "--generator", str(small_run / "generator"), "--task", str(task_file), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    written = GeneratedAdapter.from_safetensors_bytes((out / ADAPTER_WEIGHTS).read_bytes())

    base = load_base_model("tiny")
    checkpoint = load_checkpoint(small_run / "generator")
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
    in_process = AdapterGenerator(checkpoint, encoder, condition="examples")  # the CLI's default
    expected = in_process.generate(TaskSpec.from_dict(spec))
    assert written.sha256 == expected.sha256 and written.adapter_id == expected.adapter_id
    both = AdapterGenerator(checkpoint, encoder, condition="both").generate(TaskSpec.from_dict(spec))
    assert both.adapter_id != expected.adapter_id  # the two conditionings never share an id

    # plain peft gives the same logits as icm-lora's own LoRA model
    ids = torch.tensor([[1, 30, 31, 32, 33]])
    ours = LoraModel(base.model, expected.lora)
    ours.load_tensors(expected.tensors)
    plain = PeftModel.from_pretrained(load_base_model("tiny").model, str(out))
    with torch.no_grad():
        assert torch.allclose(ours.model(ids).logits, plain(ids).logits, atol=1e-5)


def test_cli_errors_are_clear(small_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    result = runner.invoke(
        app, ["generate", "--generator", str(small_run / "generator"), "--task", str(bad), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "invalid JSON" in result.output
    empty = tmp_path / "empty.json"
    empty.write_text('{"description": ""}')
    result = runner.invoke(
        app,
        ["generate", "--generator", str(small_run / "generator"), "--task", str(empty), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "description or at least one example" in result.output
    result = runner.invoke(
        app, ["generate", "--generator", str(tmp_path), "--task", str(empty), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    result = runner.invoke(app, ["train-generator", "--run", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a run folder" in result.output
    result = runner.invoke(app, ["train-loras", "--run", str(tmp_path / "r"), "--suite", "nope:1"])
    assert result.exit_code == 2 and "unknown suite" in result.output
    result = runner.invoke(app, ["train-loras", "--run", str(small_run), "--suite", "synthetic:3"])
    assert result.exit_code == 2 and "resume without" in result.output
