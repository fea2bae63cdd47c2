"""Choosing the real-task suite reproducibly: candidates from BIG-bench, a pilot, and the suite file.

1. ``candidates``: every English BIG-bench task (or subtask) that is multiple choice or short-answer generative, with
   enough examples and inputs that fit the training length. Families with many subtasks are capped (a seeded sample)
   so that a pilot spreads its time over many families.
2. ``pilot``: per candidate, the base model and a short LoRA are scored on a slice of its test examples
   (``PilotRow``); rows are files, so a pilot is resumable and can be sharded over processes or sessions.
3. ``choose``: the tasks a short LoRA lifts by at least ``min_lift`` above base; whole families are held out
   (seeded) until enough held-out tasks of both kinds are reached, plus one member of every family whose members
   share a description but differ in behaviour (e.g. bbq ``*_ambig`` / ``*_disambig``). The suite file lists the
   training tasks, then the held-out ones marked ``unseen``.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NON_ENGLISH = ("non-english", "translation", "low-resource language", "non-language")
MIN_EXAMPLES = 40
MAX_INPUT_CHARS = 400  # median input length; longer inputs would mostly be cut to the training length
MAX_ANSWER_CHARS = 24  # median answer length of a generative task ("short-answer")


@dataclass(frozen=True)
class Candidate:
    name: str
    family: str
    kind: str  # "multiple_choice" | "generative"
    examples: int
    description: str


def _mostly_latin(text: str, share: float = 0.9) -> bool:
    """At least ``share`` of the letters are ASCII (catches tasks in other scripts that no keyword marks)."""
    letters = [c for c in text if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) / len(letters) >= share


def _kind(examples: list[dict[str, Any]]) -> str | None:
    if all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples):
        return "multiple_choice"
    if all("target" in e and not isinstance(e.get("target_scores"), dict) for e in examples):
        return "generative"
    return None


def _target(example: dict[str, Any]) -> str:
    target = example["target"]
    return str(target[0] if isinstance(target, list) and target else target)


def read_candidate(root: Path, path: Path) -> Candidate | None:
    """The task at ``path`` (a ``task.json`` under ``root``) if it qualifies, else None."""
    name = str(path.parent.relative_to(root))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or len(examples) < MIN_EXAMPLES:
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("input"), str) for e in examples):
        return None
    keywords = [str(k).lower() for k in data.get("keywords", [])]
    leaf = name.rsplit("/", 1)[-1].lower()
    english_subtask = leaf.endswith("_en") or "_en_" in leaf or "english" in leaf
    if not english_subtask and (any(k in keywords for k in NON_ENGLISH) or "multilingual" in keywords):
        return None  # keywords are the family's: an explicitly English subtask of a multilingual family stays
    if not _mostly_latin(" ".join(e["input"] for e in examples[:200])):
        return None
    kind = _kind(examples)
    if kind is None:
        return None
    if statistics.median(len(e["input"]) for e in examples) > MAX_INPUT_CHARS:
        return None
    if kind == "generative" and statistics.median(len(_target(e)) for e in examples) > MAX_ANSWER_CHARS:
        return None
    return Candidate(name, name.split("/")[0], kind, len(examples), str(data.get("description", "")).strip())


def find_candidates(root: Path, per_family: int = 0, seed: int = 0) -> list[Candidate]:
    """Qualifying tasks under ``root`` (a ``bigbench/benchmark_tasks`` folder), sorted by name; with ``per_family``
    > 0 at most that many per family (a seeded sample). A task with subtasks is represented by its subtasks."""
    found: dict[str, list[Candidate]] = defaultdict(list)
    for path in sorted(root.rglob("task.json")):
        if any(path.parent.glob("*/task.json")):
            continue  # a parent task: its subtasks are the candidates
        candidate = read_candidate(root, path)
        if candidate is not None:
            found[candidate.family].append(candidate)
    chosen: list[Candidate] = []
    for family in sorted(found):
        members = sorted(found[family], key=lambda c: c.name)
        if 0 < per_family < len(members):
            members = sorted(random.Random(f"{seed}:{family}").sample(members, per_family), key=lambda c: c.name)
        chosen += members
    return chosen


def write_candidates(candidates: Sequence[Candidate], path: Path) -> None:
    lines = ["# Candidates for the real-task suite (generator.training.suite_selection.find_candidates): name kind"]
    lines += [f"{c.name} {c.kind}" for c in candidates]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_candidates(path: Path) -> list[str]:
    names = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


@dataclass(frozen=True)
class PilotRow:
    task: str
    family: str
    kind: str
    description: str
    base: float
    lora: float
    test_examples: int
    seconds: float
    settings: dict[str, Any]

    @property
    def lift(self) -> float:
        return self.lora - self.base

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lift": round(self.lift, 4)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PilotRow:
        return cls(**{k: v for k, v in data.items() if k != "lift"})


@dataclass(frozen=True)
class Selection:
    train: list[PilotRow]
    held_out: list[PilotRow]
    held_out_families: list[str]
    shared_description_held_out: list[str]

    def problems(
        self,
        min_train: int = 80,
        min_train_families: int = 25,
        min_generative_share: float = 0.25,
        min_held_out: int = 12,
        min_held_out_families: int = 8,
    ) -> list[str]:
        """What the selection falls short of (the issue's bar); empty when it meets it."""
        out = []
        families = {r.family for r in self.train}
        generative = sum(r.kind == "generative" for r in self.train)
        if len(self.train) < min_train:
            out.append(f"{len(self.train)} training tasks < {min_train}")
        if len(families) < min_train_families:
            out.append(f"{len(families)} training families < {min_train_families}")
        if self.train and generative / len(self.train) < min_generative_share:
            out.append(f"generative share {generative / len(self.train):.2f} < {min_generative_share}")
        if len(self.held_out) < min_held_out:
            out.append(f"{len(self.held_out)} held-out tasks < {min_held_out}")
        if len(self.held_out_families) < min_held_out_families:
            out.append(f"{len(self.held_out_families)} held-out families < {min_held_out_families}")
        kinds = {r.kind for r in self.held_out}
        if self.held_out and kinds != {"multiple_choice", "generative"}:
            out.append(f"held-out tasks are only {sorted(kinds)}")
        return out


def choose(
    rows: Iterable[PilotRow],
    min_lift: float = 0.05,
    held_out_tasks: int = 12,
    held_out_families: int = 8,
    seed: int = 0,
) -> Selection:
    """Keep tasks lifted by ``min_lift``; hold out whole families (seeded order) until at least ``held_out_tasks``
    tasks from ``held_out_families`` families of both kinds are held out; then hold out one member (seeded) of every
    remaining family whose members share a description, so examples must tell them apart."""
    kept = sorted((r for r in rows if r.lift >= min_lift), key=lambda r: r.task)
    by_family: dict[str, list[PilotRow]] = defaultdict(list)
    for row in kept:
        by_family[row.family].append(row)
    order = sorted(by_family)
    random.Random(f"held-out:{seed}").shuffle(order)
    held: list[str] = []
    count = 0
    kinds: set[str] = set()
    for family in order:
        done = count >= held_out_tasks and len(held) >= held_out_families and len(kinds) == 2
        if done:
            break
        members = by_family[family]
        if len(by_family) - len(held) <= 1:
            break  # keep at least one family to train on
        family_kinds = {r.kind for r in members}
        if count >= held_out_tasks and len(held) >= held_out_families and family_kinds <= kinds:
            continue  # only a missing kind is still wanted
        held.append(family)
        count += len(members)
        kinds |= family_kinds
    shared: list[str] = []
    for family in sorted(set(by_family) - set(held)):
        members = by_family[family]
        descriptions = defaultdict(list)
        for row in members:
            descriptions[row.description].append(row)
        groups = [g for g in descriptions.values() if len(g) >= 3 and g[0].description]
        for group in groups:
            pick = random.Random(f"shared:{seed}:{family}").choice(sorted(group, key=lambda r: r.task))
            shared.append(pick.task)
    held_rows = [r for r in kept if r.family in held or r.task in shared]
    train = [r for r in kept if r not in held_rows]
    return Selection(train, held_rows, sorted(held), sorted(shared))


Section = tuple[str, Sequence[str], bool]
"""One part of a suite file: its comment line, its task names, and whether they are held out (``NAME unseen``)."""


def write_suite_file(path: Path, header: str, sections: Sequence[Section]) -> None:
    """The header as comment lines, then each section: its comment and its names (read by ``read_names_file``)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for comment, names, unseen in sections:
        lines.append(f"# {comment}")
        lines += [f"{name} unseen" if unseen else name for name in names]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_suite(selection: Selection, path: Path, header: str) -> None:
    train = selection.train
    shared = selection.shared_description_held_out
    sections: list[Section] = [
        (
            f"training: {len(train)} tasks from {len({r.family for r in train})} families",
            [r.task for r in train],
            False,
        ),
        (
            f"held out: whole families {', '.join(selection.held_out_families)}",
            [r.task for r in selection.held_out if r.task not in shared],
            True,
        ),
    ]
    if shared:
        sections.append(
            ("held out: members of trained families that share their description with trained members", shared, True)
        )
    write_suite_file(path, header, sections)


def read_pilot(folder: Path) -> list[PilotRow]:
    return [PilotRow.from_dict(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("*.json"))]


def validation_tasks(rows: Sequence[PilotRow], suite: Sequence[str]) -> list[PilotRow]:
    """Pilot tasks of families the suite does not contain at all (neither trained on nor held out), in pilot order:
    a validation set for decisions about generated adapters (the self-check) that is disjoint from the report's
    held-out tasks, so a rule can be checked on tasks that played no part in choosing it. Most were left out of the
    suite because a short LoRA did not lift them: the tasks where an adapter is most likely to hurt."""
    families = {name.split("/", 1)[0] for name in suite}
    return [r for r in rows if r.family not in families]


def remaining_tasks(rows: Sequence[PilotRow], suite: Sequence[str]) -> list[PilotRow]:
    """Pilot tasks of families the suite does contain that the suite does not list (neither trained on nor held
    out), in pilot order: the complement of ``validation_tasks``. Mostly members of trained families that a short
    LoRA did not lift (bbq ``*_disambig`` among them, which share their description with trained ``*_ambig``
    tasks), plus the rest of held-out families. No report or decision has used them: a fresh test of tasks the
    generator's family knows but whose behaviour it never trained on."""
    families, listed = {name.split("/", 1)[0] for name in suite}, set(suite)
    return [r for r in rows if r.family in families and r.task not in listed]


def write_validation_suite(
    train: Sequence[str], validation: Sequence[PilotRow], path: Path, header: str, label: str = "validation"
) -> None:
    """A suite file: the generator's training tasks, then the validation tasks marked ``unseen``."""
    kinds, families = sum(r.kind == "generative" for r in validation), len({r.family for r in validation})
    write_suite_file(
        path,
        header,
        [
            (f"training: the {len(train)} training tasks of the generator", train, False),
            (
                f"{label}: {len(validation)} tasks ({kinds} generative) from {families} families",
                [r.task for r in validation],
                True,
            ),
        ],
    )


def split_families(rows: Sequence[PilotRow], fraction: float, seed: int) -> tuple[list[PilotRow], list[PilotRow]]:
    """Whole families, in a seeded order: the first ``fraction`` of them (rounded) and the rest, each in pilot order.
    Used to train on part of the validation families (tasks a LoRA could not lift, so the generator learns to leave
    them alone) while the other part stays a test of harm."""
    families = sorted({r.family for r in rows})
    random.Random(seed).shuffle(families)
    first = set(families[: round(len(families) * fraction)])
    return [r for r in rows if r.family in first], [r for r in rows if r.family not in first]


def write_augmented_suite(
    train: Sequence[str], extra: Sequence[PilotRow], unseen: Sequence[str], path: Path, header: str
) -> None:
    """A suite file: the training tasks, the extra training tasks, then the held-out tasks marked ``unseen``."""
    families = len({r.family for r in extra})
    write_suite_file(
        path,
        header,
        [
            (f"training: {len(train)} tasks of the suite", train, False),
            (
                f"training: {len(extra)} validation tasks from {families} families (pilot lift mostly below 0.05)",
                [r.task for r in extra],
                False,
            ),
            (f"held out: the suite's {len(unseen)} held-out tasks", unseen, True),
        ],
    )
