"""Generator training resumes after an interruption: a run killed right after it saved its state, then started
again, writes the same generator as a run that was never interrupted (reconstruction, then contrastive e2e)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from generator.base_model import load_base_model
from generator.config import CVAETrainingSettings
from generator.training.pipeline import SMALL_SETTINGS, Run, step_train_generator, step_train_loras
from generator.training.resume import STATE_INFO, STATE_WEIGHTS, Progress, TrainingState

SETTINGS = dataclasses.replace(
    SMALL_SETTINGS,
    cvae_training=CVAETrainingSettings(
        steps=30,
        batch_size=8,
        e2e_steps=30,
        e2e_learning_rate=1e-3,
        e2e_tasks_per_step=2,
        e2e_contrast_weight=1.0,
        description_dropout=0.5,
    ),
)


class Killed(Exception):
    pass


def _run(folder: Path) -> Run:
    run = Run.create(folder, SETTINGS, "synthetic:4", unseen_fraction=0.25)
    step_train_loras(run, load_base_model("tiny"), multitask_steps=0, progress=False, oracles=False)
    return run


def test_interrupted_training_resumes_to_the_same_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = step_train_generator(_run(tmp_path / "whole"), load_base_model("tiny"), progress=False).checkpoint

    run = _run(tmp_path / "cut")
    save = TrainingState.save

    def save_then_die(self: TrainingState, *args: object) -> None:
        save(self, *args)  # type: ignore[arg-type]
        raise Killed

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    with pytest.raises(Killed):
        step_train_generator(run, load_base_model("tiny"), progress=False)
    assert (run.generator_dir / STATE_WEIGHTS).is_file() and not (run.generator_dir / "generator.json").exists()
    monkeypatch.setattr(TrainingState, "save", save)

    resumed = step_train_generator(Run.open(run.folder), load_base_model("tiny"), progress=False).checkpoint
    assert resumed.info["e2e_resumed_at"] == 20
    assert not (run.generator_dir / STATE_WEIGHTS).exists() and not (run.generator_dir / STATE_INFO).exists()
    mine, theirs = resumed.cvae.state_dict(), whole.cvae.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    timing = {"e2e_seconds", "e2e_resumed_at"}
    assert {k: v for k, v in resumed.info.items() if k not in timing} == {
        k: v for k, v in whole.info.items() if k not in timing
    }
    assert "final_recon_loss" in resumed.info  # reconstruction's figures come back with the state


def test_a_state_for_other_settings_is_not_used(tmp_path: Path) -> None:
    state = TrainingState(tmp_path, "one")
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state.save(module, optimizer, scheduler, random.Random(0), Progress(step=3))
    assert state.exists()
    assert not TrainingState(tmp_path, "two").exists()
    assert TrainingState(tmp_path, "two").load(module, optimizer, scheduler, random.Random(0)) is None
