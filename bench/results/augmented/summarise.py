"""Figures of this experiment from the committed rows: python bench/results/augmented/summarise.py -> results.json

For each generator (shipped, augmented, control): on the 16 held-out tasks and on the 28 harm-test tasks, the mean of
each variant, paired 95% bootstrap intervals, the adapters more than 3 points below / above base, and the worst task
after the self-check minus base."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from generator.training.evaluate import paired_bootstrap  # noqa: E402

RUNS = {
    "shipped": (HERE.parent / "e2e-contrast" / "rows", HERE / "rows-harm-shipped"),
    "augmented": (HERE / "rows-held-out-augmented", HERE / "rows-harm-augmented"),
    "control": (HERE / "rows-held-out-control", HERE / "rows-harm-control"),
}
VARIANTS = {
    "held_out": ("base", "in_context_8", "generated", "generated_desc", "wrong_vector", "generated_checked"),
    "harm_test": ("base", "generated", "generated_checked"),
}
PAIRS = (
    ("generated", "base"),
    ("generated", "wrong_vector"),
    ("generated", "in_context_8"),
    ("generated_checked", "base"),
)


def unseen_rows(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    return [r for r in rows if r["split"] == "unseen"]


def figures(rows: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, Any]:
    means = {v: round(statistics.fmean(r["scores"][v] for r in rows), 4) for v in variants}
    gains = [r["scores"]["generated"] - r["scores"]["base"] for r in rows]
    return {
        "tasks": len(rows),
        "means": means,
        "pairs": {f"{a} - {b}": paired_bootstrap(rows, a, b) for a, b in PAIRS if a in means and b in means},
        "harmful": sum(g < -0.03 for g in gains),
        "helpful": sum(g > 0.03 for g in gains),
        "worst_checked_minus_base": round(min(r["scores"]["generated_checked"] - r["scores"]["base"] for r in rows), 4),
    }


def main() -> None:
    out = {
        name: {
            "held_out": figures(unseen_rows(held), VARIANTS["held_out"]),
            "harm_test": figures(unseen_rows(harm), VARIANTS["harm_test"]),
        }
        for name, (held, harm) in RUNS.items()
    }
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
