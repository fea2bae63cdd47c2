"""Choose the real-task suite reproducibly (``generator.training.suite_selection``): candidates, pilot, suite file.

    python bench/select_suite.py candidates                 # -> bench/suites/bigbench-candidates.txt
    python bench/select_suite.py pilot --shard 1/2          # -> bench/results/pilot/<task>.json (resumable)
    python bench/select_suite.py write                      # -> bench/suites/bigbench.txt from the pilot rows
    python bench/select_suite.py validation                 # -> bench/suites/bigbench-check-validation.txt
    python bench/select_suite.py augmented                  # -> bench/suites/bigbench-augmented.txt (+ -harm-test)
    python bench/select_suite.py remaining                  # -> bench/suites/bigbench-remaining.txt

The pilot trains a short LoRA per candidate (``--steps`` of batch 8 on its train examples, answers ending with EOS)
and scores it and the base model on the first ``--test`` test examples (multiple choice by log-likelihood,
generative by exact match). Each row is written when its task is done, so the pilot resumes where it stopped and
can be spread over processes (``--shard I/N``, one thread each) and sessions. The rows are small and committed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.base_model import load_base_model
from generator.config import LoraSettings, LoraTrainingSettings
from generator.files import safe_name, write_json
from generator.lora_model import LoraModel
from generator.tasks import load_bigbench_task
from generator.training.pipeline import read_names_file
from generator.training.scoring import score_examples
from generator.training.suite_selection import (
    PilotRow,
    choose,
    find_candidates,
    read_candidates,
    read_pilot,
    remaining_tasks,
    split_families,
    validation_tasks,
    write_augmented_suite,
    write_candidates,
    write_suite,
    write_validation_suite,
)
from generator.training.train_loras import encode_examples, train_lora

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("ICM_LORA_DATA_DIR", Path.home() / ".cache" / "icm-lora"))
ROOT = DATA / "bigbench" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
CANDIDATES = HERE / "suites" / "bigbench-candidates.txt"
PILOT = HERE / "results" / "pilot"
SUITE = HERE / "suites" / "bigbench.txt"
VALIDATION = HERE / "suites" / "bigbench-check-validation.txt"
AUGMENTED = HERE / "suites" / "bigbench-augmented.txt"
HARM_TEST = HERE / "suites" / "bigbench-harm-test.txt"
REMAINING = HERE / "suites" / "bigbench-remaining.txt"
# suites of pilot tasks beside the generator's: which tasks, and the file's header ({suite}: the suite file's name)
SIDE_SUITES = {
    "validation": (
        validation_tasks,
        "The self-check's validation suite, written by bench/select_suite.py validation: every pilot task\n"
        "(bench/results/pilot/) of a family that {suite} neither trains on nor holds out.",
    ),
    "remaining": (
        remaining_tasks,
        "Tasks no report or decision has used, written by bench/select_suite.py remaining: every pilot task\n"
        "(bench/results/pilot/) of a family in {suite} that {suite} does not list.",
    ),
}


def pilot(args: argparse.Namespace) -> None:
    names = read_candidates(args.candidates)
    index, _, count = (args.shard or "1/1").partition("/")
    mine = [n for i, n in enumerate(names) if i % int(count) == int(index) - 1]
    todo = [n for n in mine if not (args.out / f"{safe_name(n)}.json").is_file()][: args.limit or None]
    print(f"pilot: {len(mine)} candidates in this shard, {len(todo)} to do", flush=True)
    if not todo:
        return
    base = load_base_model("smollm2-135m")
    lora = LoraModel(base.model, LoraSettings(), init_seed=0)
    settings = LoraTrainingSettings(
        steps=args.steps, batch_size=8, learning_rate=3e-3, max_length=72, checkpoints=1, checkpoint_every=1
    )
    pad = int(base.tokenizer.pad_token_id)
    for name in todo:
        if (args.out / f"{safe_name(name)}.json").is_file():
            continue  # another process (one walking the list from the other end) did it meanwhile
        began = time.perf_counter()
        task = load_bigbench_task(args.root / name / "task.json", name=name, max_test=args.test, max_examples=2000)
        with lora.base_only() as plain:
            base_scores = score_examples(plain, base.tokenizer, task, max_length=settings.max_length)
        pairs = encode_examples(base.tokenizer, task.train, settings.max_length, settings.end_token)
        trained = train_lora(lora, pad, pairs, settings, name)
        lora.load_vector(trained.checkpoints[-1])
        lora_scores = score_examples(lora.model, base.tokenizer, task, max_length=settings.max_length)
        row = PilotRow(
            task=name,
            family=task.family,
            kind="multiple_choice" if task.is_multiple_choice else "generative",
            description=task.description,
            base=round(sum(base_scores) / len(base_scores), 4),
            lora=round(sum(lora_scores) / len(lora_scores), 4),
            test_examples=len(task.test),
            seconds=round(time.perf_counter() - began, 1),
            settings={"steps": settings.steps, "batch_size": 8, "learning_rate": 3e-3, "max_length": 72},
        )
        write_json(args.out / f"{safe_name(name)}.json", row.to_dict())
        print(f"{name}: base {row.base:.3f} lora {row.lora:.3f} ({row.seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cand = sub.add_parser("candidates", help="list the candidate tasks")
    cand.add_argument("--root", type=Path, default=ROOT)
    cand.add_argument("--out", type=Path, default=CANDIDATES)
    cand.add_argument("--per-family", type=int, default=0, help="at most this many subtasks per family (0: all)")
    pil = sub.add_parser("pilot", help="score base and a short LoRA per candidate")
    pil.add_argument("--root", type=Path, default=ROOT)
    pil.add_argument("--candidates", type=Path, default=CANDIDATES)
    pil.add_argument("--out", type=Path, default=PILOT)
    pil.add_argument("--shard", default="")
    pil.add_argument("--steps", type=int, default=24)
    pil.add_argument("--test", type=int, default=24)
    pil.add_argument("--limit", type=int, default=0, help="stop after this many tasks (0: all)")
    wri = sub.add_parser("write", help="write the suite file from the pilot rows")
    wri.add_argument("--pilot", type=Path, default=PILOT)
    wri.add_argument("--out", type=Path, default=SUITE)
    wri.add_argument("--min-lift", type=float, default=0.05)
    wri.add_argument("--seed", type=int, default=0)
    val = sub.add_parser("validation", help="write the self-check's validation suite: pilot tasks of new families")
    val.add_argument("--pilot", type=Path, default=PILOT)
    val.add_argument("--suite", type=Path, default=SUITE)
    val.add_argument("--out", type=Path, default=VALIDATION)
    rem = sub.add_parser("remaining", help="pilot tasks of the suite's families that the suite does not list")
    rem.add_argument("--pilot", type=Path, default=PILOT)
    rem.add_argument("--suite", type=Path, default=SUITE)
    rem.add_argument("--out", type=Path, default=REMAINING)
    aug = sub.add_parser("augmented", help="the suite plus a seeded half of the validation families as training")
    aug.add_argument("--pilot", type=Path, default=PILOT)
    aug.add_argument("--suite", type=Path, default=SUITE)
    aug.add_argument("--out", type=Path, default=AUGMENTED)
    aug.add_argument("--test-out", type=Path, default=HARM_TEST)
    aug.add_argument("--fraction", type=float, default=0.5)
    aug.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "candidates":
        candidates = find_candidates(args.root, args.per_family)
        write_candidates(candidates, args.out)
        kinds = sum(c.kind == "generative" for c in candidates)
        families = len({c.family for c in candidates})
        print(f"{len(candidates)} candidates ({kinds} generative) from {families} families -> {args.out}")
    elif args.command == "pilot":
        pilot(args)
    elif args.command == "augmented":
        names, unseen = read_names_file(args.suite)
        train = [n for n in names if n not in unseen]
        extra, rest = split_families(validation_tasks(read_pilot(args.pilot), names), args.fraction, args.seed)
        header = (
            f"{args.suite.name} plus the validation tasks of a seeded ({args.seed}) {args.fraction:.0%} of the\n"
            "validation families as training tasks; written by bench/select_suite.py augmented. The other families'\n"
            f"tasks are the harm test ({args.test_out.name})."
        )
        write_augmented_suite(train, extra, unseen, args.out, header)
        test_header = (
            f"The harm test: validation tasks of the families that {args.out.name} does not train on; written by\n"
            "bench/select_suite.py augmented."
        )
        write_validation_suite(train + [r.task for r in extra], rest, args.test_out, test_header)
        print(f"{len(extra)} extra training tasks, {len(rest)} harm-test tasks -> {args.out}, {args.test_out}")
    elif args.command in SIDE_SUITES:
        names, unseen = read_names_file(args.suite)
        select, header = SIDE_SUITES[args.command]
        chosen = select(read_pilot(args.pilot), names)
        write_validation_suite(
            [n for n in names if n not in unseen], chosen, args.out, header.format(suite=args.suite.name), args.command
        )
        print(f"{len(chosen)} {args.command} tasks from {len({r.family for r in chosen})} families -> {args.out}")
    else:
        rows = read_pilot(args.pilot)
        selection = choose(rows, args.min_lift, seed=args.seed)
        header = (
            "The real-task suite, chosen by bench/select_suite.py from the pilot rows in bench/results/pilot/:\n"
            f"tasks a short LoRA lifts by >= {args.min_lift:.2f} above base; held-out families seeded by {args.seed}."
        )
        write_suite(selection, args.out, header)
        problems = selection.problems()
        print(f"{len(selection.train)} training and {len(selection.held_out)} held-out tasks -> {args.out}")
        for problem in problems:
            print(f"short of the bar: {problem}")


if __name__ == "__main__":
    main()
