"""Shared fixtures: the tiny base model, small task suites and a small trained generator (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from generator.base_model import BaseModel, load_base_model


@pytest.fixture
def tiny_base() -> BaseModel:
    """A fresh tiny model per test (PEFT wraps models in place, so tests must not share one)."""
    return load_base_model("tiny")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with 6 synthetic tasks (2 unseen), their LoRAs and a trained generator."""
    from generator.training.pipeline import run_small

    return run_small(tmp_path_factory.mktemp("small-run")).folder
