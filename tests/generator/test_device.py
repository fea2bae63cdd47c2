"""Device and dtype settings: auto choices, clear start-up errors, the low-precision CPU warning, loading on them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from generator import device as device_module
from generator.base_model import load_base_model
from generator.device import CPU_FP32, Placement, PlacementError, resolve_placement
from icm_lora.cli import app
from service.config import Settings


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_float32_without_a_gpu(no_gpu: None) -> None:
    assert resolve_placement() == CPU_FP32
    assert resolve_placement("auto", "auto").name == "cpu-float32"
    assert resolve_placement(" CPU ", "float32") == CPU_FP32


def test_cuda_without_a_gpu_fails_with_a_clear_message(no_gpu: None) -> None:
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(PlacementError, match=r"asks for a GPU.*set the device to cpu"):
            resolve_placement(asked, "auto")


def test_a_gpu_index_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PlacementError, match=r"has 1 GPU\(s\), cuda:0..cuda:0"):
        resolve_placement("cuda:2", "float32")


def test_malformed_names_are_refused() -> None:
    for device, dtype in (("gpu", "auto"), ("cuda:x", "auto"), ("cpu", "fp8"), ("cpu", "half")):
        with pytest.raises(PlacementError, match="must be"):
            resolve_placement(device, dtype)
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        Settings(device="gpu")
    with pytest.raises(ValidationError, match="dtype must be one of"):
        Settings(dtype="int8")


def test_settings_resolve_and_refuse_a_missing_gpu(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICM_LORA_DEVICE", "cuda")
    settings = Settings()
    assert settings.device == "cuda"
    with pytest.raises(PlacementError, match="asks for a GPU"):
        settings.placement()
    assert Settings(device="cpu", dtype="bfloat16").placement() == Placement(torch.device("cpu"), torch.bfloat16)


def test_slow_low_precision_on_this_cpu_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device_module, "cpu_matmul_slowdown", lambda dtype: 120.0)
    with caplog.at_level(logging.WARNING, logger="generator.device"):
        assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    assert "bfloat16 on this CPU: its matmuls measured 120x slower than float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(device_module, "cpu_matmul_slowdown", lambda dtype: 1.5)
    with caplog.at_level(logging.WARNING, logger="generator.device"):
        resolve_placement("cpu", "float16")
    assert caplog.text == ""


def test_the_probe_measures_something() -> None:
    slowdown = device_module.cpu_matmul_slowdown(torch.bfloat16, size=32, repeats=1)
    assert slowdown > 0.0


def test_the_tiny_model_loads_in_the_chosen_dtype() -> None:
    base = load_base_model("tiny", placement=Placement(torch.device("cpu"), torch.bfloat16))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert base.placement == Placement(torch.device("cpu"), torch.bfloat16)
    fp32 = load_base_model("tiny")
    # built in fp32 then cast: the same weights, rounded
    assert torch.equal(base.model.lm_head.weight, fp32.model.lm_head.weight.to(torch.bfloat16))


def test_cli_commands_refuse_a_missing_gpu_before_loading(no_gpu: None, tmp_path: Path) -> None:
    runner = CliRunner()
    task = tmp_path / "task.json"
    task.write_text('{"description": "x", "examples": []}')
    commands = [
        ["generate", "--generator", str(tmp_path / "missing"), "--task", str(task), "--out", str(tmp_path / "o")],
        ["train-loras", "--run", str(tmp_path / "run")],
        ["train-generator", "--run", str(tmp_path / "run")],
        ["evaluate", "--run", str(tmp_path / "run")],
        ["demo", "--out", str(tmp_path / "run")],
        ["serve"],
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--device", "cuda"])
        assert result.exit_code == 2, (command, result.output)
        assert "asks for a GPU" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()  # failed before anything was created


def test_training_in_bf16_keeps_fp32_lora_weights_and_task_vectors() -> None:
    from generator.config import LoraSettings, LoraTrainingSettings, TaskEncoderSettings
    from generator.lora_model import LoraModel
    from generator.task_encoder import TaskEncoder
    from generator.tasks import Example
    from generator.training.train_loras import encode_examples, train_lora

    base = load_base_model("tiny", placement=Placement(torch.device("cpu"), torch.bfloat16))
    lora = LoraModel(base.model, LoraSettings(rank=2, alpha=4.0))
    examples = [Example("kiwi pear", "yes"), Example("dog cat", "no")]
    pairs = encode_examples(base.tokenizer, examples, max_length=24)
    settings = LoraTrainingSettings(steps=2, batch_size=2, learning_rate=1e-2, checkpoints=1, checkpoint_every=1)
    trained = train_lora(lora, int(base.tokenizer.pad_token_id), pairs, settings, "t")
    assert trained.checkpoints.dtype == torch.float32 and bool(torch.isfinite(trained.checkpoints).all())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in lora.tensors().values())
    encoder = TaskEncoder.for_model(
        base.model, base.tokenizer, TaskEncoderSettings(max_examples=2, max_length=24), no_adapter=lora.base_only
    )
    vector = encoder.in_context_vector(examples)
    assert vector.dtype == torch.float32 and vector.shape == (base.hidden_size,)


def test_the_service_refuses_a_missing_gpu_before_it_starts(no_gpu: None, tmp_path: Path) -> None:
    from service.main import create_app

    with pytest.raises(PlacementError, match="asks for a GPU"):
        create_app(Settings(device="cuda", base_model="tiny", data_dir=tmp_path))
    assert create_app(Settings(device="cpu", base_model="tiny", data_dir=tmp_path)).title == "icm-lora"


def test_end_to_end_training_and_evaluation_on_a_bf16_model(tmp_path: Path) -> None:
    """The generator trains end to end through a bf16 base model (fp32 LoRAs, as peft keeps them) and is scored."""
    import dataclasses

    from generator.config import CVAETrainingSettings
    from generator.training.pipeline import SMALL_SETTINGS, Run, step_evaluate, step_train_generator

    settings = dataclasses.replace(SMALL_SETTINGS, cvae_training=CVAETrainingSettings(steps=0, e2e_steps=6))
    run = Run.create(tmp_path / "run", settings, "synthetic:3", unseen_fraction=0.34)
    base = load_base_model("tiny", placement=Placement(torch.device("cpu"), torch.bfloat16))
    generator = step_train_generator(run, base, progress=False)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in generator.checkpoint.cvae.parameters())
    assert torch.isfinite(torch.tensor(generator.checkpoint.info["e2e_final_loss"]))
    report = step_evaluate(run, base, progress=False, plot=False, variants=("base", "generated"))
    assert report["tasks"] and all("generated" in r["correct"] for r in report["tasks"])
