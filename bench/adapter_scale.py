"""Adapter strength: generated adapters shrunk towards the base model (B scaled by alpha), paired with stored rows.

    python bench/adapter_scale.py score --rows bench/results/check-validation/rows \
        --out bench/results/adapter-scale/validation --shard 0 --shards 2        # one process per shard
    python bench/adapter_scale.py summary --out bench/results/adapter-scale/validation

The plan and its decision rule are in ``bench/results/adapter-scale/plan.md`` (written before scoring). For each
task of a stored report's rows: the generator (``--generator``, the fp16 one the rows used) conditioned on the 8
examples alone, its weight change scaled by each ``--alphas`` value, scored on the same test examples with the
report's scorer. ``alpha = 1`` is the rows' ``generated_examples`` variant; ``--check`` re-scores it on that many
tasks and stops if more than ``MAX_DIFFERING`` test examples differ (the pairing would be wrong; rows scored on
another machine may differ at a near tie). Each task's row (stored variants plus ``alpha_X``) is
written to ``OUT/rows/``; an existing row with every alpha is kept (the run resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import sharded_cli
from generator.base_model import BaseModel, load_base_model
from generator.checkpoint import GeneratorCheckpoint, load_checkpoint
from generator.files import write_json
from generator.generate import AdapterGenerator
from generator.lora_model import LoraModel
from generator.task_encoder import TaskEncoder, TaskVector
from generator.tasks import Task, load_bigbench_task
from generator.training.evaluate import SPEC_EXAMPLES, paired_bootstrap
from generator.training.pipeline import BIGBENCH_MAX_EXAMPLES, BIGBENCH_MAX_TEST
from generator.training.scoring import score_examples

ROOT = Path.home() / ".cache/icm-lora/bigbench/bigbench-1.0.0/bigbench/benchmark_tasks"
GENERATOR = Path(__file__).resolve().parent / "results/e2e-contrast/generator"
STORED = "generated_examples"
MAX_DIFFERING = 1  # a near tie of a multiple-choice example may flip with another machine's float rounding


def variant(alpha: float) -> str:
    return f"alpha_{alpha:g}"


def gamma_variant(gamma: float) -> str:
    return f"gamma_{gamma:g}"


def extrapolated(vector: TaskVector, mean: torch.Tensor, gamma: float) -> TaskVector:
    """The examples-only task vector moved ``gamma`` times as far from the training tasks' mean in-context vector
    (``gamma`` > 1 stresses what sets this task's examples apart from the average task's)."""
    assert vector.in_context is not None
    return TaskVector(None, mean + gamma * (vector.in_context - mean))


def scaled(tensors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The adapter whose weight change is ``alpha`` times the original's (every ``lora_B`` scaled)."""
    return {k: v * alpha if "lora_B" in k else v for k, v in tensors.items()}


def load_scorer(folder: Path) -> tuple[GeneratorCheckpoint, AdapterGenerator, BaseModel, LoraModel]:
    """The generator in ``folder`` (its task vectors read by one copy of SmolLM2) and a LoRA on another copy."""
    checkpoint = load_checkpoint(folder)
    reader = load_base_model("smollm2-135m")
    generator = AdapterGenerator(checkpoint, TaskEncoder.for_model(reader.model, reader.tokenizer, checkpoint.encoder))
    base = load_base_model("smollm2-135m")
    return checkpoint, generator, base, LoraModel(base.model, checkpoint.layout.settings)


def stored_task(path: Path, row: dict[str, Any], generator_id: str) -> Task:
    """The task of a stored row, loaded as the row's scorer loaded it; exits where the row cannot be paired (another
    generator made it, or the test examples differ)."""
    if row["generator_id"] != generator_id:
        sys.exit(f"{path}: scored with generator {row['generator_id']}, not {generator_id}")
    name = row["task"]
    task = load_bigbench_task(
        ROOT / name / "task.json", name=name, max_test=BIGBENCH_MAX_TEST, max_examples=BIGBENCH_MAX_EXAMPLES
    )
    if len(task.test) != len(row["correct"]["base"]):
        sys.exit(f"{name}: {len(task.test)} test examples here, {len(row['correct']['base'])} in the row")
    return task


def score(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    stored = sorted(args.rows.glob("*.json"))
    mine = [p for i, p in enumerate(stored) if i % args.shards == args.shard]
    checkpoint, generator, base, lora = load_scorer(args.generator)
    out_dir = args.out / "rows"
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [variant(a) for a in args.alphas] + [gamma_variant(g) for g in args.gammas]
    checked = 0
    for path in mine:
        row = json.loads(path.read_text(encoding="utf-8"))
        if STORED not in row["correct"]:
            continue  # a row scored without the examples-only variant (the report's seen tasks): nothing to pair
        target = out_dir / path.name
        if target.exists() and set(wanted) <= set(json.loads(target.read_text(encoding="utf-8"))["correct"]):
            continue
        task = stored_task(path, row, checkpoint.generator_id)
        name = task.name
        vector = generator.encoder.encode(task.spec(SPEC_EXAMPLES))
        tensors = checkpoint.layout.unflatten(generator.decode_vector(TaskVector(None, vector.in_context)))
        alphas = list(args.alphas) + ([1.0] if checked < args.check else [])
        correct: dict[str, list[float]] = {}
        for alpha in alphas:
            lora.load_tensors(scaled(tensors, alpha))
            correct[variant(alpha)] = score_examples(lora.model, base.tokenizer, task, max_length=args.max_length)
        for gamma in args.gammas:
            moved = extrapolated(vector, checkpoint.cond.in_context_mean, gamma)
            lora.load_vector(generator.decode_vector(moved))
            correct[gamma_variant(gamma)] = score_examples(lora.model, base.tokenizer, task, max_length=args.max_length)
        differing = None
        if 1.0 in alphas:
            checked += 1
            again = correct.pop(variant(1.0))
            differing = sum(a != b for a, b in zip(again, row["correct"][STORED], strict=True))
            if differing > MAX_DIFFERING:
                sys.exit(f"{name}: alpha = 1 differs from the stored {STORED} on {differing} test examples")
            print(f"{name}: alpha = 1 re-scored, {differing} test example(s) differ from the stored row", flush=True)
        keep = {k: row["correct"][k] for k in row["correct"] if k in ("base", "in_context_8", STORED, "wrong_vector")}
        out = {k: row[k] for k in ("task", "kind", "family", "split", "generator_id")} | {
            "correct": keep | correct,
            "scores": {k: round(statistics.fmean(v), 4) for k, v in (keep | correct).items()},
        }
        if differing is not None:
            out["alpha_1_rescored_differing_examples"] = differing
        write_json(target, out)
        print(name, {k: out["scores"][k] for k in (STORED, *wanted)}, flush=True)


def summary(args: argparse.Namespace) -> None:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.out / "rows").glob("*.json"))]
    alphas = sorted({k for r in rows for k in r["correct"] if k.startswith(("alpha_", "gamma_"))})
    names = ["base", STORED, *alphas, "in_context_8"]
    result: dict[str, Any] = {"tasks": len(rows), "means": {}, "paired": {}}
    for name in names:
        have = [r for r in rows if name in r["scores"]]
        if len(have) == len(rows):
            result["means"][name] = round(statistics.fmean(r["scores"][name] for r in rows), 4)
    for a in alphas:
        result["paired"][f"{a} - alpha_1"] = paired_bootstrap(rows, a, STORED)
        result["paired"][f"{a} - base"] = paired_bootstrap(rows, a, "base")
    result["paired"]["alpha_1 - base"] = paired_bootstrap(rows, STORED, "base")
    worst = {a: min(r["scores"][a] - r["scores"]["base"] for r in rows) for a in [STORED, *alphas]}
    result["worst_task_minus_base"] = {a: round(v, 4) for a, v in worst.items()}
    write_json(args.out / "summary.json", result)
    print(json.dumps(result, indent=2))


def arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--rows", type=Path, required=True, help="a report's rows (scored with --generator)")
    run.add_argument("--generator", type=Path, default=GENERATOR)
    run.add_argument("--alphas", type=float, nargs="*", default=[0.5, 0.75])
    run.add_argument("--gammas", type=float, nargs="*", default=[], help="condition extrapolation (see extrapolated)")
    run.add_argument("--check", type=int, default=1, help="tasks per shard on which alpha = 1 is re-scored")


def main() -> None:
    sharded_cli(__doc__, score, summary, arguments)


if __name__ == "__main__":
    main()
