"""Self-check rules compared on a run's report rows: which adapters each rule lets through, and what that costs.

    python bench/check_rules.py --run runs/check-validation --out bench/results/check-validation

Every row that has a self-check (``generated_checked`` scored; the check's figures are in the row) is decided by
each rule from those stored figures, with no model run:
- ``likelihood``: the rule before accuracy came first: pass when the mean answer log-likelihood (normalised over the
  choices) is no lower than the base model's;
- ``accuracy_first``: the shipped rule (``generator.selfcheck.SelfCheck.passed``): fewer examples right than the
  base model fails, more passes, a tie goes to the likelihood;
- ``strict``: as ``accuracy_first``, but a tie fails.
For each rule: the mean test score when a failed adapter is replaced by the base model, the worst task's score minus
base, the harmful adapters (more than 3 points below base on the test examples) caught and let through, and the
helpful ones (more than 3 points above) lost. Writes ``rules.json`` and ``rules.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.selfcheck import SelfCheck

HARM = 0.03


def likelihood(check: dict[str, Any]) -> bool:
    return float(check["delta"]) >= 0.0


def accuracy_first(check: dict[str, Any]) -> bool:
    return SelfCheck(
        float(check["base_loglik"]),
        float(check["adapter_loglik"]),
        int(check["examples"]),
        bool(check["held_out"]),
        base_correct=check.get("base_correct"),
        adapter_correct=check.get("adapter_correct"),
    ).passed


def strict(check: dict[str, Any]) -> bool:
    """Multiple choice passes only with more examples right than the base model (a tie fails); otherwise the
    likelihood decides."""
    if check.get("base_correct") is None or check.get("adapter_correct") is None:
        return likelihood(check)
    return int(check["adapter_correct"]) > int(check["base_correct"])


RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "likelihood": likelihood,
    "accuracy_first": accuracy_first,
    "strict": strict,
}


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checked = [r for r in rows if r.get("self_check") and {"base", "generated"} <= set(r["scores"])]
    gains = [r["scores"]["generated"] - r["scores"]["base"] for r in checked]
    out: dict[str, Any] = {
        "tasks": len(checked),
        "multiple_choice": sum(r["kind"] == "multiple_choice" for r in checked),
        "mean_base": round(statistics.fmean(r["scores"]["base"] for r in checked), 4),
        "mean_generated": round(statistics.fmean(r["scores"]["generated"] for r in checked), 4),
        "worst_generated_minus_base": round(min(gains), 4),
        "harmful": sum(g < -HARM for g in gains),
        "helpful": sum(g > HARM for g in gains),
        "rules": {},
    }
    for name, rule in RULES.items():
        passed = [rule(r["self_check"]) for r in checked]
        after = [g if p else 0.0 for g, p in zip(gains, passed, strict=True)]
        out["rules"][name] = {
            "passed": sum(passed),
            "mean_checked": round(
                statistics.fmean(r["scores"]["base"] + a for r, a in zip(checked, after, strict=True)), 4
            ),
            "worst_checked_minus_base": round(min(after), 4),
            "harmful_caught": sum(g < -HARM and not p for g, p in zip(gains, passed, strict=True)),
            "harmful_passed": sum(g < -HARM and p for g, p in zip(gains, passed, strict=True)),
            "helpful_lost": sum(g > HARM and not p for g, p in zip(gains, passed, strict=True)),
        }
    out["per_task"] = [
        {
            "task": r["task"],
            "kind": r["kind"],
            "base": r["scores"]["base"],
            "generated": r["scores"]["generated"],
            "base_correct": r["self_check"].get("base_correct"),
            "adapter_correct": r["self_check"].get("adapter_correct"),
            "delta": r["self_check"]["delta"],
            **{name: rule(r["self_check"]) for name, rule in RULES.items()},
        }
        for r in checked
    ]
    return out


def markdown(result: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"{result['tasks']} tasks with a self-check ({result['multiple_choice']} multiple choice): base "
        f"{result['mean_base']:.3f}, generated {result['mean_generated']:.3f}, worst generated − base "
        f"{result['worst_generated_minus_base']:+.3f}; {result['harmful']} adapters more than {HARM:.2f} below base, "
        f"{result['helpful']} more than {HARM:.2f} above.",
        "",
        "| rule | passed | mean after the check | worst task − base | harmful caught | harmful passed | helpful lost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["rules"].items():
        lines.append(
            f"| {name} | {row['passed']} | {row['mean_checked']:.3f} | {row['worst_checked_minus_base']:+.3f} | "
            f"{row['harmful_caught']} | {row['harmful_passed']} | {row['helpful_lost']} |"
        )
    lines += [
        "",
        "| task | base | generated | right base / adapter (of 8) | Δ log-lik | likelihood | accuracy first | strict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in result["per_task"]:
        right = f"{t['base_correct']} / {t['adapter_correct']}" if t["base_correct"] is not None else "–"
        lines.append(
            f"| {t['task']} | {t['base']:.3f} | {t['generated']:.3f} | {right} | {t['delta']:+.3f} | "
            + " | ".join("pass" if t[name] else "fail" for name in RULES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run whose report/rows/ hold checked rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Self-check rules")
    args = parser.parse_args()
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.run / "report" / "rows").glob("*.json"))]
    result = {"run": str(args.run), **compare([r for r in rows if r.get("split") == "unseen"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rules.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = markdown(result, args.title)
    (args.out / "rules.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
