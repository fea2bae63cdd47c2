"""Shared fixtures: the tiny base model, small task suites and a small trained generator (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from generator.base_model import BaseModel, load_base_model
from generator.config import CVAETrainingSettings, LoraTrainingSettings, PipelineSettings, TaskEncoderSettings

SMALL_SETTINGS = PipelineSettings(
    base_model="tiny",
    lora_training=LoraTrainingSettings(
        steps=60, batch_size=16, learning_rate=1e-2, max_length=32, checkpoints=3, checkpoint_every=5
    ),
    encoder=TaskEncoderSettings(max_examples=8, max_length=32),
    cvae_training=CVAETrainingSettings(steps=150, batch_size=16),
)


@pytest.fixture
def tiny_base() -> BaseModel:
    """A fresh tiny model per test (PEFT wraps models in place, so tests must not share one)."""
    return load_base_model("tiny")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with 6 synthetic tasks (2 unseen), their LoRAs and a trained generator."""
    from generator.training.pipeline import Run, step_train_generator, step_train_loras

    folder = tmp_path_factory.mktemp("small-run")
    run = Run.create(folder, SMALL_SETTINGS, "synthetic:6", unseen_fraction=0.34)
    base = load_base_model("tiny")
    step_train_loras(run, base, multitask_steps=60, progress=False)
    step_train_generator(run, base, progress=False)
    return folder
