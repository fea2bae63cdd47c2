"""How task-specific is the in-context part of the task vector? A check that needs no generator training.

    python bench/task_vectors.py                  # -> bench/results/task_vectors.json

For every task of a suite file, two disjoint samples of 8 train examples (A and B) are read by the base model with
each example read (``TaskEncoderSettings.example_read``, hidden layer): a read is task-specific when B's vector is
closer to A's vector of the same task than to any other task's A (top-1 retrieval over all tasks, cosine after
centring on the mean over tasks). For tasks that share a description (BIG-bench's bbq ``*_ambig`` / ``*_disambig``)
the vector must tell them apart: ``same_description`` compares their cosine with the same-task A/B cosine.
A generator can only be as specific as its condition: this is an upper bound on what the examples can steer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.base_model import load_base_model
from generator.config import TaskEncoderSettings
from generator.task_encoder import TaskEncoder
from generator.tasks import Task, load_bigbench_task
from generator.training.suite_selection import read_candidates

HERE = Path(__file__).resolve().parent
BIGBENCH = Path.home() / ".cache/icm-lora/bigbench/bigbench-1.0.0/bigbench/benchmark_tasks"
READS = {
    "separate@middle": TaskEncoderSettings(max_examples=8, max_length=96),
    "in_context@middle": TaskEncoderSettings(max_examples=8, max_length=384, example_read="in_context", queries=3),
    "in_context@3/4": TaskEncoderSettings(
        max_examples=8, max_length=384, example_read="in_context", queries=3, hidden_layer=-8
    ),
    # the cheap reads: generation with 8 examples must stay under a second
    "separate@3/4": TaskEncoderSettings(max_examples=8, max_length=96, hidden_layer=-8),
    "in_context@3/4,1_query": TaskEncoderSettings(
        max_examples=8, max_length=384, example_read="in_context", queries=1, hidden_layer=-8
    ),
}


def samples(task: Task, seed: int = 0) -> tuple[list[Any], list[Any]]:
    examples = list(task.train)
    random.Random(f"{task.name}:{seed}").shuffle(examples)
    return examples[:8], examples[8:16]


def retrieval(a: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of B rows finding their own A row, and the [N, N] centred cosine matrix (B rows, A columns)."""
    mean = torch.cat([a, b]).mean(dim=0)
    a = torch.nn.functional.normalize(a - mean, dim=1)
    b = torch.nn.functional.normalize(b - mean, dim=1)
    cos = b @ a.T
    hits = (cos.argmax(dim=1) == torch.arange(len(a))).float().mean()
    return float(hits), cos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=HERE / "suites" / "bigbench-trial.txt")
    parser.add_argument("--reads", nargs="*", default=list(READS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "task_vectors.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    base = load_base_model("smollm2-135m")
    tasks = []
    for name in read_candidates(args.suite):
        task = load_bigbench_task(BIGBENCH / name / "task.json", name=name, max_examples=2000)
        if len(task.train) >= 16:
            tasks.append(task)
    names = [t.name for t in tasks]
    pairs = [
        (i, names.index(n.replace("_ambig", "_disambig")))
        for i, n in enumerate(names)
        if n.endswith("_ambig") and n.replace("_ambig", "_disambig") in names
    ]
    # reads not run this time are kept from an earlier run of the same file (each read records its own load)
    earlier = json.loads(args.out.read_text())["reads"] if args.out.is_file() else {}
    results: dict[str, Any] = {k: v for k, v in earlier.items() if k not in args.reads}
    for read in args.reads:
        read_load = os.getloadavg()
        encoder = TaskEncoder.for_model(base.model, base.tokenizer, READS[read])
        start = time.perf_counter()
        a = torch.stack([encoder.in_context_vector(samples(t)[0]) for t in tasks])
        seconds = (time.perf_counter() - start) / len(tasks)
        b = torch.stack([encoder.in_context_vector(samples(t)[1]) for t in tasks])
        top1, cos = retrieval(a, b)
        same_task = cos.diagonal()
        shared = []
        told_apart = 0
        for i, j in pairs:
            between, own = float(cos[i, j]), (float(same_task[i]), float(same_task[j]))
            told_apart += between < min(own)
            shared.append(
                {
                    "pair": [names[i], names[j]],
                    "cos_between": round(between, 3),
                    "cos_same_task": [round(c, 3) for c in own],
                }
            )
        results[read] = {
            "settings": READS[read].to_dict(),
            "top1_retrieval": round(top1, 3),
            "median_cos_same_task": round(float(same_task.median()), 3),
            "median_cos_other_task": round(float(cos[~torch.eye(len(tasks), dtype=torch.bool)].median()), 3),
            "same_description_pairs_told_apart": told_apart,
            "same_description_pairs": shared,
            "seconds_per_read_of_8_examples": round(seconds, 3),
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [list(read_load), list(os.getloadavg())],
        }
        print(read, {k: v for k, v in results[read].items() if k not in ("settings", "same_description_pairs")})
    report = {
        "what": "task-specificity of the in-context task vector by example read (no generator involved)",
        "model": "smollm2-135m (fp32, CPU)",
        "suite": str(args.suite.relative_to(HERE.parent)),
        "tasks": len(tasks),
        "same_description_pairs": len(pairs),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "reads": results,
        "best_top1": max(results, key=lambda r: results[r]["top1_retrieval"]),
        "median_seconds": statistics.median(r["seconds_per_read_of_8_examples"] for r in results.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
