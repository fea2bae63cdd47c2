"""The quality report: generated adapters against the base model, in-context prompting, trained and multi-task LoRAs.

Per task, on its test examples only:

=================  ==========================================================================================
base               the base model, no adapter
in_context         the base model with the description and a few train examples in the prompt
trained            the task's own trained LoRA (last checkpoint); for unseen tasks an oracle the generator never saw
checkpoint_avg     the mean of the task's kept checkpoints
multitask          one LoRA trained on all training tasks' examples
generated          the generator's adapter from the task's description + examples
generated_desc     ... from the description alone
generated_examples ... from the examples alone
wrong_vector       the generator's adapter for *another* task's vector (it should score lower)
=================  ==========================================================================================

Writes ``quality.json``, ``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from generator.files import read_json, safe_name, write_atomic, write_json
from generator.generate import AdapterGenerator
from generator.lora_model import LoraModel
from generator.task_encoder import TaskVector
from generator.tasks import Task
from generator.training.scoring import in_context_prefix, score_task
from generator.training.train_loras import Collection

VARIANTS = (
    "base",
    "in_context",
    "trained",
    "checkpoint_avg",
    "multitask",
    "generated",
    "generated_desc",
    "generated_examples",
    "wrong_vector",
)


@dataclass
class ReportInputs:
    seen: Sequence[Task]
    unseen: Sequence[Task]
    collection: Collection  # checkpoints for seen tasks, and for unseen ones when oracles were trained
    generator: AdapterGenerator
    lora: LoraModel
    tokenizer: PreTrainedTokenizerBase
    in_context_examples: int = 3
    max_length: int = 96
    variants: Sequence[str] = VARIANTS
    rows_dir: Path | None = None  # finished tasks' rows are kept here, so an interrupted evaluation resumes
    only: frozenset[str] | None = None  # score just these tasks (a shard of a parallel evaluation)


def evaluate(inputs: ReportInputs, show_progress: bool = True) -> dict[str, Any]:
    """Score the chosen variants on every task; return the report as a dict."""
    unknown = set(inputs.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown report variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    gen = inputs.generator
    seen_families = {t.family for t in inputs.seen}
    vectors: dict[str, TaskVector] = {}  # each task is encoded once, for its own row and as another's wrong vector

    def vector_of(task: Task) -> TaskVector:
        if task.name not in vectors:
            vectors[task.name] = gen.encoder.encode(task.spec(gen.encoder.settings.max_examples))
        return vectors[task.name]

    rows: list[dict[str, Any]] = []
    all_tasks = [(t, "seen") for t in inputs.seen] + [(t, "unseen") for t in inputs.unseen]
    for position, (task, split) in enumerate(tqdm(all_tasks, desc="evaluating", disable=not show_progress)):
        if inputs.only is not None and task.name not in inputs.only:
            continue
        cached = _cached_row(inputs, task)
        if cached is not None:
            rows.append(cached)
            continue
        vector = vector_of(task)
        generated = gen.decode_vector(vector)
        scores = _score_variants(inputs, task, split, position, vector, generated, vector_of)
        row = {
            "task": task.name,
            "family": task.family,
            "split": split,
            "family_seen": task.family in seen_families,
            "test_examples": len(task.test),
            "scores": scores,
            "nearest_checkpoint": _nearest_checkpoint(inputs, generated),
            "generator_id": gen.generator_id,
        }
        if inputs.rows_dir is not None:
            write_json(inputs.rows_dir / f"{safe_name(task.name)}.json", row)
        rows.append(row)
    return _summarise(rows, inputs)


def _cached_row(inputs: ReportInputs, task: Task) -> dict[str, Any] | None:
    """A finished row of this task from an interrupted run, if it was made by the same generator and variants."""
    if inputs.rows_dir is None:
        return None
    path = inputs.rows_dir / f"{safe_name(task.name)}.json"
    if not path.is_file():
        return None
    row: dict[str, Any] = read_json(path)
    same_generator = row.get("generator_id") == inputs.generator.generator_id
    return row if same_generator and set(row.get("scores", {})) <= set(inputs.variants) else None


def _score_variants(
    inputs: ReportInputs,
    task: Task,
    split: str,
    position: int,
    vector: TaskVector,
    generated: torch.Tensor,
    vector_of: Callable[[Task], TaskVector],
) -> dict[str, float]:
    gen = inputs.generator
    wanted = set(inputs.variants)
    index = {name: i for i, name in enumerate(inputs.collection.tasks)}
    scores: dict[str, float] = {}
    with inputs.lora.base_only() as base:
        if "base" in wanted:
            scores["base"] = score_task(base, inputs.tokenizer, task, max_length=inputs.max_length)
        if "in_context" in wanted:
            prefix = in_context_prefix(task, inputs.in_context_examples)
            scores["in_context"] = score_task(base, inputs.tokenizer, task, prefix, max_length=inputs.max_length * 6)
    if task.name in index:
        checkpoints = inputs.collection.checkpoints[index[task.name]]
        if "trained" in wanted:
            scores["trained"] = _score_vector(inputs, task, checkpoints[-1])
        if "checkpoint_avg" in wanted:
            scores["checkpoint_avg"] = _score_vector(inputs, task, checkpoints.mean(dim=0))
    if inputs.collection.multitask is not None and "multitask" in wanted:
        scores["multitask"] = _score_vector(inputs, task, inputs.collection.multitask)
    if "generated" in wanted:
        scores["generated"] = _score_vector(inputs, task, generated)
    if vector.description is not None and "generated_desc" in wanted:
        scores["generated_desc"] = _score_vector(inputs, task, gen.decode_vector(TaskVector(vector.description, None)))
    if vector.in_context is not None and "generated_examples" in wanted:
        scores["generated_examples"] = _score_vector(
            inputs, task, gen.decode_vector(TaskVector(None, vector.in_context))
        )
    if split == "seen" and len(inputs.seen) > 1 and "wrong_vector" in wanted:
        wrong = vector_of(_wrong_task(inputs.seen, position))
        scores["wrong_vector"] = _score_vector(inputs, task, gen.decode_vector(wrong))
    return scores


def _wrong_task(seen: Sequence[Task], position: int) -> Task:
    """Another seen task, from another family where there is one (a sibling task may share the right answer)."""
    task = seen[position]
    for step in range(1, len(seen)):
        other = seen[(position + step) % len(seen)]
        if other.family != task.family:
            return other
    return seen[(position + 1) % len(seen)]


def _score_vector(inputs: ReportInputs, task: Task, vector: torch.Tensor) -> float:
    inputs.lora.load_vector(vector)
    return score_task(inputs.lora.model, inputs.tokenizer, task, max_length=inputs.max_length)


def _nearest_checkpoint(inputs: ReportInputs, generated: torch.Tensor) -> dict[str, Any]:
    """Distance from a generated adapter to the closest kept checkpoint of the generator's training tasks."""
    trained_on = {t["name"] for t in inputs.generator.checkpoint.training_tasks}
    rows = [i for i, name in enumerate(inputs.collection.tasks) if name in trained_on]
    if not rows:
        return {}
    pool = inputs.collection.checkpoints[rows].reshape(-1, generated.numel())
    l2 = torch.linalg.vector_norm(pool - generated, dim=1)
    best = int(torch.argmin(l2))
    cosine = torch.nn.functional.cosine_similarity(pool[best], generated, dim=0)
    k = inputs.collection.checkpoints.shape[1]
    return {
        "task": inputs.collection.tasks[rows[best // k]],
        "l2": float(l2[best]),
        "relative_l2": float(l2[best] / torch.linalg.vector_norm(pool[best]).clamp_min(1e-12)),
        "cosine": float(cosine),
    }


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _summarise(rows: list[dict[str, Any]], inputs: ReportInputs) -> dict[str, Any]:
    means: dict[str, dict[str, float | None]] = {}
    groups = {
        "seen": [r for r in rows if r["split"] == "seen"],
        "unseen": [r for r in rows if r["split"] == "unseen"],
        "unseen_seen_family": [r for r in rows if r["split"] == "unseen" and r.get("family_seen")],
        "unseen_new_family": [r for r in rows if r["split"] == "unseen" and not r.get("family_seen", True)],
    }
    for group, group_rows in groups.items():
        if group_rows or group in ("seen", "unseen"):
            means[group] = {v: _mean([r["scores"][v] for r in group_rows if v in r["scores"]]) for v in VARIANTS}
    ratios = [
        r["scores"]["generated"] / r["scores"]["trained"]
        for r in rows
        if r["split"] == "seen" and r["scores"].get("trained")
    ]
    seen = means["seen"]
    checkpoint = inputs.generator.checkpoint
    summary: dict[str, Any] = {
        "median_generated_over_trained_seen": round(statistics.median(ratios), 4) if ratios else None,
        "generated_over_trained_mean_seen": (
            round(seen["generated"] / seen["trained"], 4) if seen["generated"] is not None and seen["trained"] else None
        ),
        "wrong_vector_gap_seen": (
            round(seen["generated"] - seen["wrong_vector"], 4)
            if seen["generated"] is not None and seen["wrong_vector"] is not None
            else None
        ),
        "generator_bytes": checkpoint.nbytes(),
        "collection_bytes": inputs.collection.nbytes(),
    }
    return {
        "in_context_examples": inputs.in_context_examples,
        "generator_id": checkpoint.generator_id,
        "base_model": checkpoint.base_model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variants": list(VARIANTS),
        "means": means,
        "summary": summary,
        "tasks": rows,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Mean score per variant for seen and unseen tasks, then one row per task."""

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| split | " + " | ".join(VARIANTS) + " |", "| --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    counts = {
        "seen": sum(r["split"] == "seen" for r in report["tasks"]),
        "unseen": sum(r["split"] == "unseen" for r in report["tasks"]),
        "unseen_seen_family": sum(r["split"] == "unseen" and r.get("family_seen", False) for r in report["tasks"]),
        "unseen_new_family": sum(r["split"] == "unseen" and not r.get("family_seen", True) for r in report["tasks"]),
    }
    for split, means in report["means"].items():
        n = counts.get(split, 0)
        lines.append(f"| **{split}** (mean of {n}) | " + " | ".join(fmt(means[v]) for v in VARIANTS) + " |")
    lines.append("")
    lines.append("| task | split | " + " | ".join(VARIANTS) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |")
    for row in report["tasks"]:
        cells = " | ".join(fmt(row["scores"].get(v)) for v in VARIANTS)
        lines.append(f"| {row['task']} | {row['split']} | {cells} |")
    summary = report["summary"]
    lines.append("")
    lines.append(f"- median generated / trained on seen tasks: {fmt(summary['median_generated_over_trained_seen'])}")
    lines.append(f"- right vector minus wrong vector on seen tasks: {fmt(summary['wrong_vector_gap_seen'])}")
    ratio = summary["generator_bytes"] / max(1, summary["collection_bytes"])
    lines.append(
        f"- generator {summary['generator_bytes'] / 1e6:.2f} MB vs LoRA collection "
        f"{summary['collection_bytes'] / 1e6:.2f} MB ({ratio:.1%})"
    )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("seen", "unseen") if any(r["split"] == s for r in report["tasks"])]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(splits))
    for k, split in enumerate(splits):
        values = [report["means"][split][v] or 0.0 for v in VARIANTS]
        ax.bar([i + k * width for i in range(len(VARIANTS))], values, width, label=f"{split} tasks")
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(VARIANTS))], VARIANTS, rotation=30, ha="right")
    ax.set_ylabel("mean test score")
    ax.set_ylim(0, 1)
    ax.set_title(f"icm-lora quality ({report['base_model']}, generator {report['generator_id']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path, plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "quality.json", report)
    write_atomic(out_dir / "quality.md", markdown_table(report).encode("utf-8"))
    if plot:
        plot_report(report, out_dir / "quality.png")
