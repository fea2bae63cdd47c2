"""The quality report: generated adapters against the base model, in-context prompting, trained and multi-task LoRAs.

Per task, on its test examples only (every variant that uses examples uses the same 8 train examples, the spec a user
of the task would send: ``task.spec(8)``):

==================  =========================================================================================
base                the base model, no adapter
in_context          the base model with the description and 3 of the examples in the prompt
in_context_8        ... with all 8 examples in the prompt
trained             the task's own trained LoRA (last checkpoint); for unseen tasks an oracle the generator never saw
checkpoint_avg      the mean of the task's kept checkpoints
multitask           one LoRA trained on all training tasks' examples
generated           the generator's adapter from the task's description + examples
generated_desc      ... from the description alone
generated_examples  ... from the examples alone
wrong_vector        the generator's adapter for *another* task of the same split (another family where there is one)
generated_checked   ``generated`` after its self-check: where the adapter fails, the base model answers
refined             ``generated`` refined by ``REFINE`` steps on the 8 examples (``generator.refine``)
lora_from_init      a LoRA trained from the standard initialisation with the same steps and examples
==================  =========================================================================================

Each row keeps the per-example results of each variant, so differences between variants get paired bootstrap
intervals (``paired_bootstrap``). Writes ``quality.json``, ``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from generator.checkpoint import SHIPPED_WEIGHTS
from generator.files import read_json, safe_name, write_atomic, write_json
from generator.generate import AdapterGenerator
from generator.lora_model import LoraModel
from generator.refine import RefinePlan, refine
from generator.selfcheck import LoraModelScorer, self_check
from generator.task_encoder import TaskVector
from generator.tasks import Task
from generator.training.scoring import in_context_prefix, score_examples
from generator.training.train_loras import Collection

VARIANTS = (
    "base",
    "in_context",
    "in_context_8",
    "trained",
    "checkpoint_avg",
    "multitask",
    "generated",
    "generated_desc",
    "generated_examples",
    "wrong_vector",
    "generated_checked",
    "refined",
    "lora_from_init",
)
SPEC_EXAMPLES = 8
# variants whose results do not depend on the generator (nor on the run's LoRA collection): kept per task under a key
# of everything they do depend on, so another generator of the same suite, or a new variant set, reuses them
GENERATOR_FREE = frozenset({"base", "in_context", "in_context_8", "lora_from_init"})
REFINE = RefinePlan(steps=32)  # the service's defaults (lr, batch, length) with refine_steps=32
COMPARISONS = (  # (a, b): paired interval of a - b
    ("generated", "base"),
    ("generated", "in_context_8"),
    ("generated", "wrong_vector"),
    ("generated", "multitask"),
    ("generated_checked", "base"),
    ("refined", "lora_from_init"),
    ("refined", "base"),
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
    shared_dir: Path | None = None  # generator-independent results, shared by the runs of one suite (see below)


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
            vectors[task.name] = gen.encoder.encode(task.spec(SPEC_EXAMPLES))
        return vectors[task.name]

    rows: list[dict[str, Any]] = []
    all_tasks = [(t, "seen") for t in inputs.seen] + [(t, "unseen") for t in inputs.unseen]
    for task, split in tqdm(all_tasks, desc="evaluating", disable=not show_progress):
        if inputs.only is not None and task.name not in inputs.only:
            continue
        key = _task_key(inputs, task)
        cached = _cached_row(inputs, task, key)
        asked = set(cached.get("asked", cached.get("variants", []))) if cached else set()
        if cached is not None and set(inputs.variants) <= asked:  # every variant was tried (some may not apply)
            rows.append(_trimmed(cached, inputs.variants))
            continue
        known = {**_shared_results(inputs, task, key), **(cached.get("correct", {}) if cached else {})}
        vector = vector_of(task)
        generated = gen.decode_vector(vector)
        peers = inputs.seen if split == "seen" else inputs.unseen
        wrong = _wrong_task(peers, task)
        correct, extra = _score_variants(inputs, task, vector, generated, vector_of, wrong, known)
        old_extra = {k: v for k, v in (cached or {}).items() if k not in _ROW_FIELDS}
        row = {
            "task": task.name,
            "family": task.family,
            "split": split,
            "kind": "multiple_choice" if task.is_multiple_choice else "generative",
            "family_seen": task.family in seen_families,
            "test_examples": len(task.test),
            "variants": sorted(correct),
            "asked": sorted(asked | set(inputs.variants)),
            "scores": {k: round(sum(v) / max(1, len(v)), 4) for k, v in correct.items()},
            "correct": correct,
            **old_extra,
            **extra,
            "nearest_checkpoint": _nearest_checkpoint(inputs, generated),
            "generator_id": gen.generator_id,
            "task_key": key,
        }
        if inputs.rows_dir is not None:
            write_json(inputs.rows_dir / f"{safe_name(task.name)}.json", row)
        _share(inputs, task, key, correct)
        rows.append(_trimmed(row, inputs.variants))
    return _summarise(rows, inputs)


_ROW_FIELDS = frozenset(
    {"task", "family", "split", "kind", "family_seen", "test_examples", "variants", "asked", "scores", "correct"}
    | {"nearest_checkpoint", "generator_id", "task_key"}
)


def _task_key(inputs: ReportInputs, task: Task) -> str:
    """Everything a generator-independent result depends on: the base model, the LoRA shape and init, the scoring
    length, the task's description, spec examples and test examples, and the refinement plan."""
    spec = task.spec(SPEC_EXAMPLES)
    parts = {
        "model": str(getattr(inputs.tokenizer, "name_or_path", "")),
        "lora": inputs.lora.settings.to_dict(),
        "init": float(inputs.lora.init_vector.double().sum()),
        "max_length": inputs.max_length,
        "in_context_examples": inputs.in_context_examples,
        "refine": REFINE.to_dict(),
        "description": task.description,
        "spec": [[e.input, e.output, e.choices] for e in spec.examples],
        "test": [[e.input, e.output, e.choices] for e in task.test],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _cached_row(inputs: ReportInputs, task: Task, key: str) -> dict[str, Any] | None:
    """This task's row from an earlier evaluation of the run: all of it when the same generator made it, else only
    its generator-independent results (a retrained generator keeps the base and in-context scores)."""
    if inputs.rows_dir is None:
        return None
    path = inputs.rows_dir / f"{safe_name(task.name)}.json"
    if not path.is_file():
        return None
    row: dict[str, Any] = read_json(path)
    if row.get("generator_id") == inputs.generator.generator_id:
        return row
    if row.get("task_key") == key:
        free = {k: v for k, v in row.get("correct", {}).items() if k in GENERATOR_FREE}
        seconds = {k: row[k] for k in ("lora_from_init_seconds",) if k in row and "lora_from_init" in free}
        return {"correct": free, "asked": sorted(free), **seconds}
    return None


def _trimmed(row: dict[str, Any], variants: Sequence[str]) -> dict[str, Any]:
    """The row with just the report's variants."""
    wanted = set(variants)
    keep = {name: {k: v for k, v in row.get(name, {}).items() if k in wanted} for name in ("scores", "correct")}
    return {**row, **keep, "variants": sorted(wanted & set(row.get("correct", {})))}


def _shared_results(inputs: ReportInputs, task: Task, key: str) -> dict[str, list[float]]:
    if inputs.shared_dir is None:
        return {}
    path = inputs.shared_dir / f"{safe_name(task.name)}-{key}.json"
    return dict(read_json(path)["correct"]) if path.is_file() else {}


def _share(inputs: ReportInputs, task: Task, key: str, correct: dict[str, list[float]]) -> None:
    if inputs.shared_dir is None:
        return
    known = _shared_results(inputs, task, key)
    free = {k: v for k, v in correct.items() if k in GENERATOR_FREE and k not in known}
    if free:  # nothing new: the file stays as it is
        path = inputs.shared_dir / f"{safe_name(task.name)}-{key}.json"
        write_json(path, {"task": task.name, "correct": {**known, **free}})


def _score_variants(
    inputs: ReportInputs,
    task: Task,
    vector: TaskVector,
    generated: torch.Tensor,
    vector_of: Callable[[Task], TaskVector],
    wrong: Task | None,
    known: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-example results of each wanted variant (those in ``known`` are not scored again: the report's, plus
    every known one), and extra facts for the row (self-check, refinement time)."""
    gen = inputs.generator
    out: dict[str, list[float]] = dict(known or {})
    wanted = set(inputs.variants) - set(out)
    index = {name: i for i, name in enumerate(inputs.collection.tasks)}
    spec = task.spec(SPEC_EXAMPLES)
    extra: dict[str, Any] = {}
    with inputs.lora.base_only() as base:
        if wanted & {"base", "generated_checked"} and "base" not in out:
            out["base"] = score_examples(base, inputs.tokenizer, task, max_length=inputs.max_length)
        for name, n in (("in_context", inputs.in_context_examples), ("in_context_8", SPEC_EXAMPLES)):
            if name in wanted:
                prefix = in_context_prefix(task.description, spec.examples[:n])
                out[name] = score_examples(base, inputs.tokenizer, task, prefix, max_length=inputs.max_length * 10)
    if task.name in index:
        checkpoints = inputs.collection.checkpoints[index[task.name]]
        if "trained" in wanted:
            out["trained"] = _score_vector(inputs, task, checkpoints[-1])
        if "checkpoint_avg" in wanted:
            out["checkpoint_avg"] = _score_vector(inputs, task, checkpoints.mean(dim=0))
    if inputs.collection.multitask is not None and "multitask" in wanted:
        out["multitask"] = _score_vector(inputs, task, inputs.collection.multitask)
    if wanted & {"generated", "generated_checked"} and "generated" not in out:
        out["generated"] = _score_vector(inputs, task, generated)
    if vector.description is not None and "generated_desc" in wanted:
        out["generated_desc"] = _score_vector(inputs, task, gen.decode_vector(TaskVector(vector.description, None)))
    if vector.in_context is not None and "generated_examples" in wanted:
        out["generated_examples"] = _score_vector(inputs, task, gen.decode_vector(TaskVector(None, vector.in_context)))
    if wrong is not None and "wrong_vector" in wanted:
        out["wrong_vector"] = _score_vector(inputs, task, gen.decode_vector(vector_of(wrong)))
        extra["wrong_task"] = wrong.name
    if "generated_checked" in wanted:
        adapter = gen.from_task_vector(vector, identity="evaluation")
        check = self_check(
            spec,
            adapter,
            LoraModelScorer(inputs.lora, int(inputs.tokenizer.pad_token_id)),
            inputs.tokenizer,
            read=gen.encoder.settings.max_examples,
            max_length=inputs.max_length,
        )
        passed = check is None or check.passed
        out["generated_checked"] = out["generated"] if passed else out["base"]
        extra["self_check"] = check.to_dict() if check is not None else None
    for name, start in (("refined", generated), ("lora_from_init", None)):
        if name in wanted:
            began = time.perf_counter()
            vector_out = refine(inputs.lora, inputs.tokenizer, spec, REFINE, start, task.name)
            extra[f"{name}_seconds"] = round(time.perf_counter() - began, 2)
            out[name] = _score_vector(inputs, task, vector_out)
    return out, extra


def _wrong_task(peers: Sequence[Task], task: Task) -> Task | None:
    """Another task of the same split, from another family where there is one (a sibling may share the answer)."""
    others = [t for t in peers if t.name != task.name]
    if not others:
        return None
    names = [t.name for t in peers]
    position = names.index(task.name) if task.name in names else 0
    ordered = others[position % len(others) :] + others[: position % len(others)]
    return next((t for t in ordered if t.family != task.family), ordered[0])


def _score_vector(inputs: ReportInputs, task: Task, vector: torch.Tensor) -> list[float]:
    inputs.lora.load_vector(vector)
    return score_examples(inputs.lora.model, inputs.tokenizer, task, max_length=inputs.max_length)


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


def report_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    unseen = [r for r in rows if r["split"] == "unseen"]
    return {
        "seen": [r for r in rows if r["split"] == "seen"],
        "unseen": unseen,
        "unseen_seen_family": [r for r in unseen if r.get("family_seen")],
        "unseen_new_family": [r for r in unseen if not r.get("family_seen", True)],
        "unseen_multiple_choice": [r for r in unseen if r.get("kind") == "multiple_choice"],
        "unseen_generative": [r for r in unseen if r.get("kind") == "generative"],
    }


def paired_bootstrap(
    rows: Sequence[dict[str, Any]], a: str, b: str, resamples: int = 2000, seed: int = 0
) -> dict[str, float | int] | None:
    """Mean of (a - b) over every test example of ``rows`` that has both variants, with a 95% bootstrap interval.

    Examples are resampled within each task (a stratified bootstrap), so every task keeps its weight; each example is
    paired with itself across the two variants. None when no row has both."""
    diffs = [
        torch.tensor(r["correct"][a]) - torch.tensor(r["correct"][b])
        for r in rows
        if a in r.get("correct", {}) and b in r.get("correct", {})
    ]
    if not diffs:
        return None
    generator = torch.Generator().manual_seed(seed)
    total = sum(len(d) for d in diffs)
    means = torch.zeros(resamples)
    for d in diffs:
        picks = torch.randint(len(d), (resamples, len(d)), generator=generator)
        means += d[picks].sum(dim=1) / total
    point = float(sum(d.sum() for d in diffs) / total)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return {
        "mean": round(point, 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "examples": total,
        "tasks": len(diffs),
    }


def delta_weights(generator: AdapterGenerator, vector: torch.Tensor) -> torch.Tensor:
    """The weight change B·A of every LoRA'd module (times the LoRA scaling), flattened and concatenated."""
    tensors = generator.checkpoint.layout.unflatten(vector)
    scaling = generator.checkpoint.layout.settings.scaling
    parts = []
    for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
        parts.append((tensors[key.replace("lora_A", "lora_B")] @ tensors[key]).reshape(-1) * scaling)
    return torch.cat(parts)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In float64: over a whole adapter's weight change fp32 rounding alone gives cosines above 1."""
    return round(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)), 4)


def counterpart(task: Task, others: Sequence[Task]) -> Task | None:
    """The task that shares ``task``'s description but behaves differently: its ``_ambig``/``_disambig`` twin where
    there is one, else the first other task with the same description."""
    same = [t for t in others if t.name != task.name and t.description == task.description and t.description]
    swap = {"_disambig": "_ambig", "_ambig": "_disambig"}
    for old, new in swap.items():
        if task.name.endswith(old):
            twin = task.name[: -len(old)] + new
            return next((t for t in same if t.name == twin), same[0] if same else None)
    return same[0] if same else None


def examples_sensitivity(
    generator: AdapterGenerator, tasks: Sequence[Task], of: Sequence[Task]
) -> list[dict[str, Any]]:
    """For each task of ``of`` that shares its description with another task of ``tasks``: the cosine between the
    weight changes of the two tasks' generated adapters (low = the examples steer the adapter apart), and between the
    task's full adapter and its description-only adapter (the examples' own effect)."""
    out = []
    for task in of:
        other = counterpart(task, tasks)
        if other is None:
            continue
        vector = generator.encoder.encode(task.spec(SPEC_EXAMPLES))
        mine = delta_weights(generator, generator.decode_vector(vector))
        theirs = delta_weights(generator, generator.decode_vector(generator.encoder.encode(other.spec(SPEC_EXAMPLES))))
        described = delta_weights(generator, generator.decode_vector(TaskVector(vector.description, None)))
        out.append(
            {
                "task": task.name,
                "counterpart": other.name,
                "cosine_to_counterpart": _cosine(mine, theirs),
                "cosine_to_description_only": _cosine(mine, described),
            }
        )
    return out


def _seen_collection_bytes(inputs: ReportInputs) -> int:
    """Bytes of one fp32 LoRA per training task: the adapter store the generator replaces (one adapter per task, not
    the C checkpoints a reconstruction run trains on; an end-to-end run collects none, and replaces the same store)."""
    return inputs.lora.layout.dim * 4 * len(inputs.seen)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _summarise(rows: list[dict[str, Any]], inputs: ReportInputs) -> dict[str, Any]:
    means: dict[str, dict[str, float | None]] = {}
    groups = report_groups(rows)
    for group, group_rows in groups.items():
        if group_rows or group in ("seen", "unseen"):
            means[group] = {v: _mean([r["scores"][v] for r in group_rows if v in r["scores"]]) for v in VARIANTS}
    intervals = {
        group: {f"{a} - {b}": paired_bootstrap(group_rows, a, b) for a, b in COMPARISONS}
        for group, group_rows in groups.items()
        if group_rows and group.startswith("unseen")
    }
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
        "generator_bytes": checkpoint.nbytes(True, SHIPPED_WEIGHTS),  # what ships (icm-lora export-generator)
        "trained_generator_bytes": checkpoint.nbytes(),  # the training checkpoint, encoder and fp32 included
        "collection_bytes": _seen_collection_bytes(inputs),
        "objective": checkpoint.info.get("objective", "reconstruction"),
        "self_check_failed_unseen": sum(
            1 for r in rows if r["split"] == "unseen" and (r.get("self_check") or {}).get("passed") is False
        ),
    }
    return {
        "in_context_examples": inputs.in_context_examples,
        "generator_id": checkpoint.generator_id,
        "base_model": checkpoint.base_model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variants": list(VARIANTS),
        "means": means,
        "intervals": intervals,
        "summary": summary,
        "tasks": rows,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Mean score per variant for seen and unseen tasks, then one row per task."""

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| split | " + " | ".join(VARIANTS) + " |", "| --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    counts = {group: len(group_rows) for group, group_rows in report_groups(report["tasks"]).items()}
    for split, means in report["means"].items():
        n = counts.get(split, 0)
        lines.append(f"| **{split}** (mean of {n}) | " + " | ".join(fmt(means[v]) for v in VARIANTS) + " |")
    lines.append("")
    lines.append("| task | split | " + " | ".join(VARIANTS) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |")
    for row in report["tasks"]:
        cells = " | ".join(fmt(row["scores"].get(v)) for v in VARIANTS)
        lines.append(f"| {row['task']} | {row['split']} | {cells} |")
    for group, comparisons in report.get("intervals", {}).items():
        found = {name: ci for name, ci in comparisons.items() if ci is not None}
        if found:
            lines += ["", f"Paired differences, {group} (mean over test examples, 95% bootstrap interval):", ""]
            lines += [
                f"- {name}: {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]" for name, ci in found.items()
            ]
    summary = report["summary"]
    lines.append("")
    lines.append(f"- median generated / trained on seen tasks: {fmt(summary['median_generated_over_trained_seen'])}")
    lines.append(f"- right vector minus wrong vector on seen tasks: {fmt(summary['wrong_vector_gap_seen'])}")
    ratio = summary["generator_bytes"] / summary["collection_bytes"]
    lines.append(
        f"- generator {summary['generator_bytes'] / 1e6:.2f} MB packed ({SHIPPED_WEIGHTS}) vs one LoRA per training "
        f"task {summary['collection_bytes'] / 1e6:.2f} MB ({ratio:.1%})"
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
