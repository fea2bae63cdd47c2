"""The generator pipeline on the other supported architectures (tiny random models, no download): a short LoRA
collection and generator training complete, and the generated adapter loads into plain peft and changes the output.
Llama is the pipeline's own test model (tests/generator/test_end_to_end.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.base_model import load_base_model
from generator.checkpoint import load_checkpoint
from generator.config import (
    CVAETrainingSettings,
    LoraSettings,
    LoraTrainingSettings,
    PipelineSettings,
    TaskEncoderSettings,
)
from generator.generate import AdapterGenerator
from generator.task_encoder import TaskEncoder
from generator.training.pipeline import Run, step_train_generator, step_train_loras


@pytest.mark.parametrize("architecture", ["qwen2", "mistral", "gemma2", "gemma3", "phi3"])
def test_short_collection_and_generator_run(architecture: str, tmp_path: Path) -> None:
    name = f"tiny-{architecture}"
    settings = PipelineSettings(
        base_model=name,
        lora=LoraSettings(rank=2, alpha=4.0, target_modules=("qkv_proj",) if architecture == "phi3" else ("q_proj",)),
        lora_training=LoraTrainingSettings(
            steps=4, batch_size=4, learning_rate=1e-2, max_length=24, checkpoints=2, checkpoint_every=2
        ),
        encoder=TaskEncoderSettings(max_examples=2, max_length=24),
        cvae_training=CVAETrainingSettings(steps=4, batch_size=4),
    )
    run = Run.create(tmp_path / "run", settings, "synthetic:3", unseen_fraction=0.34)
    base = load_base_model(name)
    step_train_loras(run, base, multitask_steps=2, progress=False)
    step_train_generator(run, base, progress=False)

    checkpoint = load_checkpoint(run.generator_dir)
    assert checkpoint.base_model == base.name
    _, unseen = run.tasks()
    spec = unseen[0].spec(2)
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
    adapter = AdapterGenerator(checkpoint, encoder).generate(spec)
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())
    peft_model = PeftModel.from_pretrained(load_base_model(name).model, adapter.save_peft(tmp_path / "adapter")).eval()
    ids = torch.tensor([base.tokenizer("Input: cat Output:")["input_ids"]])
    with torch.inference_mode():
        with_adapter = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
    assert bool(torch.isfinite(with_adapter).all()) and not torch.allclose(with_adapter, without)
