"""Refinement start: refinement from the examples-only adapter (what the service does) and from it halved.

    python bench/refine_start.py score --shard 0 --shards 2        # one single-threaded process per shard
    python bench/refine_start.py summary

The plan and its decision rule are in ``bench/results/refine-start/plan.md`` (written before scoring). For each
held-out task of the report's rows that has ``refined`` and ``lora_from_init``: the generator the rows used,
conditioned on the 8 examples alone, is refined with the report's plan (``evaluate.REFINE``: 32 steps, the service's
defaults) from its adapter and from that adapter with every ``lora_B`` times 0.5, and both are scored on the same test
examples. The stored ``refined`` (from the description + examples adapter) is re-run on the first task of each shard:
how many test examples another machine's refinement changes is recorded, not a reason to stop (32 training steps
carry float rounding further than one scoring pass does). Rows go to ``OUT/rows/``; finished tasks are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_scale import GENERATOR, load_scorer, scaled, stored_task
from bench.common import sharded_cli
from generator.files import write_json
from generator.refine import refine
from generator.task_encoder import TaskVector
from generator.training.evaluate import REFINE, SPEC_EXAMPLES, paired_bootstrap
from generator.training.scoring import score_examples

ROWS = Path(__file__).resolve().parent / "results/e2e-contrast/rows"
OUT = Path(__file__).resolve().parent / "results/refine-start"
STARTS = {"refined_examples": 1.0, "refined_examples_half": 0.5}  # variant: scale of the start's weight change
KEPT = ("base", "in_context_8", "trained", "generated", "generated_examples", "refined", "lora_from_init")


def score(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    stored = [p for p in sorted(args.rows.glob("*.json")) if "refined" in json.loads(p.read_text("utf-8"))["correct"]]
    mine = [p for i, p in enumerate(stored) if i % args.shards == args.shard]
    checkpoint, generator, base, lora = load_scorer(args.generator)
    layout = checkpoint.layout
    out_dir = args.out / "rows"
    out_dir.mkdir(parents=True, exist_ok=True)
    for position, path in enumerate(mine):
        row = json.loads(path.read_text(encoding="utf-8"))
        target = out_dir / path.name
        if target.exists():
            continue
        task = stored_task(path, row, checkpoint.generator_id)
        name = task.name
        spec = task.spec(SPEC_EXAMPLES)
        vector = generator.encoder.encode(spec)
        examples_only = layout.unflatten(generator.decode_vector(TaskVector(None, vector.in_context)))
        starts = {v: layout.flatten(scaled(examples_only, alpha)) for v, alpha in STARTS.items()}
        if position == 0:
            starts["refined_again"] = generator.decode_vector(vector)
        correct: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for variant, start in starts.items():
            began = time.perf_counter()
            refined = refine(lora, base.tokenizer, spec, REFINE, start, f"{name} {variant}")
            seconds[variant] = round(time.perf_counter() - began, 1)
            lora.load_vector(refined)
            correct[variant] = score_examples(lora.model, base.tokenizer, task, max_length=args.max_length)
        out: dict[str, Any] = {k: row[k] for k in ("task", "kind", "family", "split", "generator_id")}
        if "refined_again" in correct:
            again = correct.pop("refined_again")
            stored_refined = row["correct"]["refined"]
            out["refined_rerun_differing_examples"] = sum(a != b for a, b in zip(again, stored_refined, strict=True))
        keep = {k: row["correct"][k] for k in KEPT if k in row["correct"]}
        out |= {
            "correct": keep | correct,
            "scores": {k: round(statistics.fmean(v), 4) for k, v in (keep | correct).items()},
            "refine_seconds": seconds,
        }
        write_json(target, out)
        print(name, {k: out["scores"][k] for k in ("refined", "lora_from_init", *STARTS)}, seconds, flush=True)


def summary(args: argparse.Namespace) -> None:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.out / "rows").glob("*.json"))]
    means = {v: round(statistics.fmean(r["scores"][v] for r in rows), 4) for v in (*KEPT, *STARTS)}
    gap = means["trained"] - means["base"]
    result: dict[str, Any] = {
        "tasks": len(rows),
        "means": means,
        "share_of_oracle_gap": {v: round((means[v] - means["base"]) / gap, 3) for v in ("refined", *STARTS)},
        "paired": {
            f"{a} - {b}": paired_bootstrap(rows, a, b)
            for a in STARTS
            for b in ("lora_from_init", "refined", "base", "generated_examples")
        }
        | {
            "refined_examples_half - refined_examples": paired_bootstrap(
                rows, "refined_examples_half", "refined_examples"
            )
        },
        "worst_task_minus_base": {
            v: round(min(r["scores"][v] - r["scores"]["base"] for r in rows), 4) for v in ("refined", *STARTS)
        },
        "refined_rerun_differing_examples": {
            r["task"]: r["refined_rerun_differing_examples"] for r in rows if "refined_rerun_differing_examples" in r
        },
        "refine_seconds_median": {v: statistics.median(r["refine_seconds"][v] for r in rows) for v in STARTS},
    }
    write_json(args.out / "summary.json", result)
    print(json.dumps(result, indent=2))


def arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--rows", type=Path, default=ROWS, help="the report's rows (scored with --generator)")
    run.add_argument("--generator", type=Path, default=GENERATOR)


def main() -> None:
    sharded_cli(__doc__, score, summary, arguments, OUT)


if __name__ == "__main__":
    main()
