"""Refinement start and step size: refinement from the examples-only adapter (what the service does), scaled, or
from the standard init, at a chosen learning rate.

    python bench/refine_start.py score --shard 0 --shards 2        # one single-threaded process per shard
    python bench/refine_start.py summary
    python bench/refine_start.py score --out bench/results/refine-lr \
        --variant refined_examples_lr6=1@6e-3 --variant lora_from_init_lr6=init@6e-3
    python bench/refine_start.py summary --out bench/results/refine-lr --compare bench/results/refine-start

Plans and decision rules are in ``OUT/plan.md`` (written before scoring). For each held-out task of the report's rows
that has ``refined`` and ``lora_from_init``: the generator the rows used, conditioned on the 8 examples alone, gives
the start; each variant ``NAME=START@LR`` refines with the report's plan (``evaluate.REFINE``: 32 steps, the service's
defaults) at learning rate LR from that adapter with every ``lora_B`` times START, or from the standard init (START
``init``), and is scored on the same test examples. The default variants are the first run's: the examples-only
adapter and it halved, at the service's learning rate. The stored ``refined`` (from the description + examples
adapter) is re-run on the first task of each shard: how many test examples another machine's refinement changes is
recorded, not a reason to stop (32 training steps carry float rounding further than one scoring pass does). Rows go
to ``OUT/rows/``; finished tasks are kept. ``--compare DIR`` (summary) pairs the variants with an earlier run's too.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from generator.refine import RefinePlan, refine
from generator.task_encoder import TaskVector
from generator.training.evaluate import REFINE, SPEC_EXAMPLES, paired_bootstrap
from generator.training.scoring import score_examples

ROWS = Path(__file__).resolve().parent / "results/e2e-contrast/rows"
OUT = Path(__file__).resolve().parent / "results/refine-start"
DEFAULT_VARIANTS = ("refined_examples=1@2e-3", "refined_examples_half=0.5@2e-3")  # the first run's
KEPT = ("base", "in_context_8", "trained", "generated", "generated_examples", "refined", "lora_from_init")


@dataclasses.dataclass(frozen=True)
class Variant:
    """``NAME=START@LR``: refine from the examples-only adapter with its weight change times START (a float), or
    from the standard init (START ``init``), at learning rate LR."""

    name: str
    scale: float | None  # None: the standard init
    learning_rate: float

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        start, _, lr = rest.partition("@")
        if not name or not start or not lr:
            raise argparse.ArgumentTypeError(f"a variant is NAME=START@LR (START a scale or 'init'), not {text!r}")
        return cls(name, None if start == "init" else float(start), float(lr))

    def plan(self) -> RefinePlan:
        return dataclasses.replace(REFINE, learning_rate=self.learning_rate)


def score(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    variants: list[Variant] = args.variant or [Variant.parse(v) for v in DEFAULT_VARIANTS]
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
        starts: dict[str, tuple[torch.Tensor | None, RefinePlan]] = {
            v.name: (None if v.scale is None else layout.flatten(scaled(examples_only, v.scale)), v.plan())
            for v in variants
        }
        if position == 0:
            starts["refined_again"] = (generator.decode_vector(vector), REFINE)
        correct: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for variant, (start, plan) in starts.items():
            began = time.perf_counter()
            refined = refine(lora, base.tokenizer, spec, plan, start, f"{name} {variant}")
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
            "variants": {v.name: dataclasses.asdict(v) for v in variants},
            "refine_seconds": seconds,
        }
        write_json(target, out)
        print(
            name,
            {k: out["scores"][k] for k in ("refined", "lora_from_init", *starts) if k in out["scores"]},
            flush=True,
        )


def summary(args: argparse.Namespace) -> None:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.out / "rows").glob("*.json"))]
    ran = list(rows[0].get("variants") or [Variant.parse(v).name for v in DEFAULT_VARIANTS])
    earlier: list[str] = []
    if args.compare is not None:  # an earlier run's variants, paired by task and test example
        before = {
            r["task"]: r for r in (json.loads(p.read_text("utf-8")) for p in (args.compare / "rows").glob("*.json"))
        }
        earlier = [v for v in before[rows[0]["task"]]["correct"] if v not in rows[0]["correct"]]
        for r in rows:
            r["correct"] |= {v: before[r["task"]]["correct"][v] for v in earlier}
            r["scores"] |= {v: before[r["task"]]["scores"][v] for v in earlier}
    refined = [*ran, *earlier]
    means = {v: round(statistics.fmean(r["scores"][v] for r in rows), 4) for v in (*KEPT, *refined)}
    gap = means["trained"] - means["base"]
    against = ("lora_from_init", "refined", "base", "generated_examples", *earlier)
    result: dict[str, Any] = {
        "tasks": len(rows),
        "variants": rows[0].get("variants", DEFAULT_VARIANTS),
        "means": means,
        "share_of_oracle_gap": {v: round((means[v] - means["base"]) / gap, 3) for v in ("refined", *refined)},
        "paired": {f"{a} - {b}": paired_bootstrap(rows, a, b) for a in ran for b in (*against, *ran) if a != b},
        "worst_task_minus_base": {
            v: round(min(r["scores"][v] - r["scores"]["base"] for r in rows), 4) for v in ("refined", *refined)
        },
        "refined_rerun_differing_examples": {
            r["task"]: r["refined_rerun_differing_examples"] for r in rows if "refined_rerun_differing_examples" in r
        },
        "refine_seconds_median": {v: statistics.median(r["refine_seconds"][v] for r in rows) for v in ran},
    }
    write_json(args.out / "summary.json", result)
    print(json.dumps(result, indent=2))


def arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--rows", type=Path, default=ROWS, help="the report's rows (scored with --generator)")
    run.add_argument("--generator", type=Path, default=GENERATOR)
    run.add_argument("--variant", type=Variant.parse, action="append", help="NAME=START@LR, repeatable")


def summary_arguments(summary: argparse.ArgumentParser) -> None:
    summary.add_argument("--compare", type=Path, help="an earlier run's folder, paired by task")


def main() -> None:
    sharded_cli(__doc__, score, summary, arguments, OUT, summary_arguments)


if __name__ == "__main__":
    main()
