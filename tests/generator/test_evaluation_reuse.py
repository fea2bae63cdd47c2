"""The quality evaluation scores each (task, variant) once: a larger variant set scores only what is new, a retrained
generator keeps the generator-independent results (base, in-context, LoRA from init), and a shared folder hands
those to another run of the same suite."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from generator.base_model import load_base_model
from generator.config import CVAETrainingSettings
from generator.training import evaluate as evaluation
from generator.training.pipeline import SMALL_SETTINGS, Run, step_evaluate, step_train_generator, step_train_loras


def _counting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts scoring passes: with a prefix (in-context), without (base model or a loaded LoRA)."""
    calls: Counter[str] = Counter()
    real = evaluation.score_examples

    def counted(model, tokenizer, task, prefix="", max_length=96):  # type: ignore[no-untyped-def]
        calls["in_context" if prefix else "plain"] += 1
        return real(model, tokenizer, task, prefix, max_length)

    monkeypatch.setattr(evaluation, "score_examples", counted)
    return calls


def _run(folder: Path, seed: int) -> Run:
    settings = dataclasses.replace(SMALL_SETTINGS, cvae_training=CVAETrainingSettings(steps=40, seed=seed))
    run = Run.create(folder, settings, "synthetic:6", unseen_fraction=0.34)
    step_train_loras(run, load_base_model("tiny"), multitask_steps=0, progress=False, oracles=False)
    step_train_generator(run, load_base_model("tiny"), progress=False)
    return run


ALL = ("base", "in_context", "generated")


def _evaluate(run: Run, variants: tuple[str, ...], shared: Path | None = None) -> dict[str, Any]:
    return step_evaluate(
        run,
        load_base_model("tiny"),
        plot=False,
        progress=False,
        variants=variants,
        splits=("unseen",),
        shared_dir=shared,
    )


def test_each_result_is_scored_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    shared = tmp_path / "shared"
    run = _run(tmp_path / "a", seed=0)
    unseen = len(run.unseen)

    first = _evaluate(run, ("base", "in_context"), shared)
    assert calls == {"plain": unseen, "in_context": unseen}

    calls.clear()  # one more variant: only it is scored, the others come from the rows
    second = _evaluate(run, ALL, shared)
    assert calls == {"plain": unseen}
    for before, after in zip(first["tasks"], second["tasks"], strict=True):
        assert after["correct"]["base"] == before["correct"]["base"]
        assert set(after["correct"]) == set(ALL)

    calls.clear()  # the same report again: nothing is scored
    _evaluate(run, ("base", "generated"))
    assert not calls

    calls.clear()  # another run of the same suite, with another generator, and the shared folder
    other = _run(tmp_path / "b", seed=1)
    _evaluate(other, ALL, shared)
    assert calls == {"plain": unseen}  # generated only: base and in-context come from the shared folder

    calls.clear()  # a generator retrained in a run folder that has rows: the rows keep what does not depend on it
    retrained = _run(tmp_path / "c", seed=2)
    shutil.copytree(run.report_dir / "rows", retrained.report_dir / "rows")
    report = _evaluate(retrained, ALL)
    assert calls == {"plain": unseen}
    assert {r["generator_id"] for r in report["tasks"]}.isdisjoint(r["generator_id"] for r in first["tasks"])
