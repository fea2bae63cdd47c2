"""Paired comparison of two generators' quality reports on the tasks both scored (same test examples).

    python bench/compare_reports.py A/quality.json B/quality.json [--variant generated] [--out compare.json]
    python bench/compare_reports.py RUN_A/report/rows RUN_B/report/rows      # rows folders work too (no assembly)

For each variant, the mean difference A - B over every shared test example with a 95% stratified bootstrap interval
(``generator.training.evaluate.paired_bootstrap``), overall and per group (unseen, unseen_new_family, ...). Rows are
matched by task name; a task's test examples are the same in both reports when both runs use the same suite split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.training.evaluate import paired_bootstrap, report_groups


def compare(a: dict[str, Any], b: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    b_rows = {r["task"]: r for r in b["tasks"]}
    paired: list[dict[str, Any]] = []
    for row in a["tasks"]:
        other = b_rows.get(row["task"])
        if other is None or row.get("test_examples") != other.get("test_examples"):
            continue
        correct = {}
        for variant in variants:
            if variant in row.get("correct", {}) and variant in other.get("correct", {}):
                correct[f"A:{variant}"] = row["correct"][variant]
                correct[f"B:{variant}"] = other["correct"][variant]
        paired.append({**row, "correct": correct})
    out: dict[str, Any] = {"tasks": [r["task"] for r in paired], "groups": {}}
    for group, rows in report_groups(paired).items():
        if rows:
            out["groups"][group] = {v: paired_bootstrap(rows, f"A:{v}", f"B:{v}") for v in variants}
    return out


def load(path: Path) -> dict[str, Any]:
    """A report (``quality.json``), or a folder of report rows (``RUN/report/rows``) read as one."""
    if path.is_dir():
        return {"tasks": [json.loads(p.read_text(encoding="utf-8")) for p in sorted(path.glob("*.json"))]}
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    a, b = load(args.a), load(args.b)
    result = compare(a, b, args.variant or ["generated", "generated_checked", "wrong_vector"])
    result["a"], result["b"] = str(args.a), str(args.b)
    for group, figures in result["groups"].items():
        for variant, ci in figures.items():
            if ci is not None:
                print(f"{group:24s} {variant:18s} A-B {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
