"""Means per group and paired intervals from a run's report rows, without assembling (or timing) a full report.

    python bench/rows_summary.py --run runs/remaining --out bench/results/remaining/summary.json

For the rows' variants among base, in_context_8, generated, generated_examples (the examples without the
description), wrong_vector and generated_checked: the mean of task scores over all tasks, multiple choice, generative
and bbq ``*_disambig`` tasks; the paired differences generated - base / - wrong vector / - in-context 8, after the
self-check - base and examples only - generated over every test example (95% stratified bootstrap,
``generator.training.evaluate.paired_bootstrap``; None where a variant is missing); the worst task after the check -
base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.training.evaluate import paired_bootstrap

VARIANTS = ("base", "in_context_8", "generated", "generated_examples", "wrong_vector", "generated_checked")
PAIRS = (
    ("generated", "base"),
    ("generated", "wrong_vector"),
    ("generated", "in_context_8"),
    ("generated_checked", "base"),
    ("generated_examples", "generated"),
)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups = {
        "all": rows,
        "multiple_choice": [r for r in rows if r["kind"] == "multiple_choice"],
        "generative": [r for r in rows if r["kind"] != "multiple_choice"],
        "bbq_disambig": [r for r in rows if r["task"].startswith("bbq_lite_json/") and "disambig" in r["task"]],
    }
    out: dict[str, Any] = {"tasks": len(rows), "groups": {}, "paired": {}}
    for name, members in groups.items():
        if not members:
            continue
        out["groups"][name] = {"tasks": len(members)} | {
            v: round(statistics.fmean(r["scores"][v] for r in members), 4)
            for v in VARIANTS
            if all(v in r["scores"] for r in members)
        }
    for a, b in PAIRS:
        out["paired"][f"{a} - {b}"] = paired_bootstrap(rows, a, b)
    checked = [r for r in rows if {"generated_checked", "base"} <= set(r["scores"])]
    if checked:
        worst = min(checked, key=lambda r: r["scores"]["generated_checked"] - r["scores"]["base"])
        out["worst_checked_minus_base"] = {
            "task": worst["task"],
            "difference": round(worst["scores"]["generated_checked"] - worst["scores"]["base"], 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run whose report/rows/ hold scored rows")
    parser.add_argument("--split", default="unseen")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paths = sorted((args.run / "report" / "rows").glob("*.json"))
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    result = {"run": str(args.run), "split": args.split} | summarise([r for r in rows if r["split"] == args.split])
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["paired"], indent=2))


if __name__ == "__main__":
    main()
