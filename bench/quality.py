"""Quality report of a generator run on real tasks, with generation latency and the issue's targets checked.

    python bench/quality.py --run runs/smollm2-bigbench            # resumable; hours on a 2-core CPU for 40 tasks

Scores every report variant on every task of the run (``generator.training.evaluate``; finished tasks are kept in
``RUN/report/rows/`` so an interrupted run resumes), then times the generation of one adapter from a description
alone and from a description + 8 examples (encode + CVAE decode + unflatten, the work the service does on a cache
miss), and writes ``bench/results/quality.json``, ``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.base_model import load_base_model
from generator.generate import AdapterGenerator
from generator.lora_model import LoraModel
from generator.selfcheck import LoraModelScorer, self_check
from generator.task_encoder import TaskEncoder
from generator.tasks import Task, TaskSpec
from generator.training.evaluate import VARIANTS, examples_sensitivity, markdown_table, write_report
from generator.training.pipeline import Run, step_evaluate

RESULTS = Path(__file__).resolve().parent / "results"

TARGETS = {
    "unseen_generated_minus_base": 0.05,
    "unseen_generated_minus_in_context_8": 0.0,
    "unseen_generated_minus_wrong_vector": 0.05,
    "unseen_worst_checked_minus_base": -0.03,
    "unseen_refined_share_of_oracle_gap": 0.8,
    "unseen_refined_minus_lora_from_init": 0.0,
    "seen_median_generated_over_trained": 0.97,
    "generator_over_collection": 0.02,
    "desc_only_p50_ms": 50.0,
    "with_8_examples_p50_ms": 1000.0,
    "self_check_p50_ms": 500.0,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_generation(generator: AdapterGenerator, specs: list[TaskSpec], repeats: int) -> dict[str, float]:
    """Milliseconds per ``generate`` call over ``repeats`` rounds of ``specs`` (after one warm-up call)."""
    generator.generate(specs[0])
    durations: list[float] = []
    for _ in range(repeats):
        for spec in specs:
            start = time.perf_counter()
            generator.generate(spec)
            durations.append((time.perf_counter() - start) * 1000)
    return {
        "calls": len(durations),
        "p50_ms": round(statistics.median(durations), 2),
        "p95_ms": round(percentile(durations, 0.95), 2),
    }


def latency(run: Run, tasks: list[Task], repeats: int) -> dict[str, Any]:
    base = load_base_model(run.settings.base_model)
    lora = LoraModel(base.model, run.settings.lora, run.settings.lora_training.init_seed)
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, run.settings.encoder, no_adapter=lora.base_only)
    generator = AdapterGenerator.from_folder(run.generator_dir, encoder)
    # Distinct descriptions per call: the description embedder must not answer from a cache.
    desc_only = [TaskSpec(description=f"{t.description} (variant {i})") for i, t in enumerate(tasks)]
    with_examples = [t.spec(8) for t in tasks]
    scorer = LoraModelScorer(lora, int(base.tokenizer.pad_token_id))
    checks: list[float] = []
    for spec in with_examples[: max(3, repeats)]:
        adapter = generator.generate(spec)
        start = time.perf_counter()
        self_check(spec, adapter, scorer, base.tokenizer, read=encoder.settings.max_examples)
        checks.append((time.perf_counter() - start) * 1000)
    return {
        "torch_threads": torch.get_num_threads(),
        "description_only": time_generation(generator, desc_only, repeats),
        "description_and_8_examples": time_generation(generator, with_examples, max(1, repeats // 5)),
        "self_check": {
            "calls": len(checks),
            "p50_ms": round(statistics.median(checks), 2),
            "p95_ms": round(percentile(checks, 0.95), 2),
        },
    }


def sensitivity(run: Run, tasks: list[Task], of: list[Task]) -> list[dict[str, Any]]:
    """``examples_sensitivity`` of the held-out tasks that share a description, with their scores against base."""
    base = load_base_model(run.settings.base_model)
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, run.settings.encoder)
    generator = AdapterGenerator.from_folder(run.generator_dir, encoder)
    return examples_sensitivity(generator, tasks, of)


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the quality issue: the measured figure, the target, and whether it is met."""
    summary, means, timing = report["summary"], report["means"], report["latency"]
    unseen = means["unseen"]
    intervals = report.get("intervals", {}).get("unseen", {})
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float | None, higher_is_better: bool = True, **extra: Any) -> None:
        target = TARGETS[name]
        met = None
        if value is not None:
            met = value >= target if higher_is_better else value <= target
        checks[name] = {"value": value, "target": target, "met": met, **extra}

    gain = intervals.get("generated - base")
    check(
        "unseen_generated_minus_base",
        _diff(unseen, "generated", "base"),
        interval=gain,
    )
    if gain is not None and checks["unseen_generated_minus_base"]["met"]:
        checks["unseen_generated_minus_base"]["met"] = gain["low"] > 0
    check("unseen_generated_minus_in_context_8", _diff(unseen, "generated", "in_context_8"))
    check("unseen_generated_minus_wrong_vector", _diff(unseen, "generated", "wrong_vector"))
    unseen_rows = [r for r in report["tasks"] if r["split"] == "unseen"]
    worst = [
        r["scores"]["generated_checked"] - r["scores"]["base"]
        for r in unseen_rows
        if "generated_checked" in r["scores"] and "base" in r["scores"]
    ]
    check("unseen_worst_checked_minus_base", round(min(worst), 4) if worst else None)
    oracle = [r for r in unseen_rows if {"refined", "trained", "base"} <= set(r["scores"])]
    if oracle:
        closed = sum(r["scores"]["refined"] - r["scores"]["base"] for r in oracle)
        gap = sum(r["scores"]["trained"] - r["scores"]["base"] for r in oracle)
        check("unseen_refined_share_of_oracle_gap", round(closed / gap, 4) if gap > 0 else None)
    else:
        check("unseen_refined_share_of_oracle_gap", None)
    check("unseen_refined_minus_lora_from_init", _diff(unseen, "refined", "lora_from_init"))
    check("seen_median_generated_over_trained", summary["median_generated_over_trained_seen"])
    ratio = summary["generator_bytes"] / summary["collection_bytes"] if summary["collection_bytes"] else None
    check("generator_over_collection", None if ratio is None else round(ratio, 4), higher_is_better=False)
    check("desc_only_p50_ms", timing["description_only"]["p50_ms"], higher_is_better=False)
    check("with_8_examples_p50_ms", timing["description_and_8_examples"]["p50_ms"], higher_is_better=False)
    check("self_check_p50_ms", timing["self_check"]["p50_ms"], higher_is_better=False)
    return checks


def _diff(means: dict[str, float | None], a: str, b: str) -> float | None:
    if means.get(a) is None or means.get(b) is None:
        return None
    return round(float(means[a]) - float(means[b]), 4)  # type: ignore[arg-type]


def targets_markdown(checks: dict[str, dict[str, Any]], timing: dict[str, Any]) -> str:
    lines = ["", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for name, row in checks.items():
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {name} | {row['value']} | {row['target']} | {met} |")
    lines.append("")
    for kind, figures in timing.items():
        if isinstance(figures, dict):
            label = kind.replace("_", " ")
            lines.append(f"- generation, {label}: p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms")
    return "\n".join(lines) + "\n"


def sensitivity_markdown(report: dict[str, Any]) -> str:
    rows = {r["task"]: r["scores"] for r in report["tasks"]}
    lines = [
        "",
        "Examples sensitivity (held-out tasks that share their description with another task):",
        "",
        "| task | counterpart | cos(ΔW, counterpart's) | cos(ΔW, description only) | base | generated | checked |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for item in report.get("examples_sensitivity", []):
        scores = rows.get(item["task"], {})
        cells = " | ".join(
            f"{scores[v]:.3f}" if v in scores else "–" for v in ("base", "generated", "generated_checked")
        )
        lines.append(
            f"| {item['task']} | {item['counterpart']} | {item['cosine_to_counterpart']:.3f} | "
            f"{item['cosine_to_description_only']:.3f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/smollm2-bigbench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated report variants")
    parser.add_argument("--latency-repeats", type=int, default=5, help="rounds over the tasks for the latency")
    parser.add_argument("--shard", default="", help="I/N: only score every N-th task from the I-th, then stop")
    parser.add_argument("--splits", default="seen,unseen", help="which tasks to score: seen, unseen or both")
    parser.add_argument("--tasks", default="", help="comma-separated task names: only these")
    parser.add_argument(
        "--only-scored", action="store_true", help="assemble the report from the tasks already in RUN/report/rows"
    )
    parser.add_argument(
        "--shared-rows",
        type=Path,
        default=None,
        help="folder for generator-independent results (base, in-context, LoRA from init), reused across runs",
    )
    parser.add_argument(
        "--seen-sample", type=int, default=None, help="score only the K seen tasks `train-loras --seen-sample K` trains"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    shard = (0, 1)
    if args.shard:
        index, _, count = args.shard.partition("/")
        shard = (int(index) - 1, int(count))

    run = Run.open(args.run)
    started = time.perf_counter()
    base = load_base_model(run.settings.base_model)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    names: set[str] | None = {n.strip() for n in args.tasks.split(",") if n.strip()} or None
    if args.seen_sample is not None:
        sample = set(run.seen_sample(args.seen_sample)) | set(run.unseen)
        names = sample if names is None else names & sample
    if args.only_scored:
        scored = {json.loads(p.read_text())["task"] for p in (run.report_dir / "rows").glob("*.json")}
        names = scored if names is None else names & scored
    report = step_evaluate(
        run,
        base,
        progress=not args.no_progress,
        plot=False,
        variants=variants,
        shard=shard,
        splits=splits,
        names=names,
        shared_dir=args.shared_rows,
    )
    if shard[1] > 1:
        print(f"shard {args.shard} scored; run without --shard to assemble the report")
        return
    del base
    seen, unseen = run.tasks()
    timed = (seen if "seen" in splits else []) + (unseen if "unseen" in splits else [])
    timed = [t for t in timed if names is None or t.name in names]
    report["latency"] = latency(run, timed, args.latency_repeats)
    report["examples_sensitivity"] = sensitivity(run, seen + unseen, [t for t in unseen if t in timed])
    report["targets"] = check_targets(report)
    report["run"] = {"folder": str(args.run), "suite": run.suite, "settings": run.settings.to_dict()}
    report["machine"] = {"platform": platform.platform(), "cpus": torch.get_num_threads()}
    report["evaluate_seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, plot=True)
    table = (
        markdown_table(report) + targets_markdown(report["targets"], report["latency"]) + sensitivity_markdown(report)
    )
    (args.out / "quality.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"written to {args.out}/quality.json, quality.md, quality.png")


if __name__ == "__main__":
    main()
