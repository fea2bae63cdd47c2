"""Tasks: what a user asks an adapter for, and the suites the offline pipeline trains and evaluates on.

A ``TaskSpec`` is what the service receives (a description and a few input/output examples). A ``Task`` is a
suite member: a spec's description plus examples split into ``train`` (used for LoRA training and task vectors) and
``test`` (used only for scoring). Three suite sources: a folder of JSONL files, BIG-bench ``task.json`` files, and a
built-in synthetic family whose tasks are related to each other by construction.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_PREFIX = "Input: "
OUTPUT_PREFIX = "\nOutput:"
DEMO_SEPARATOR = "\n\n"  # between demonstrations in an in-context prompt


class TaskFormatError(ValueError):
    """A task file or task spec is malformed; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One input/output pair. For multiple-choice tasks ``choices`` lists the candidates and ``output`` is one."""

    input: str
    output: str
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.input, str) or not isinstance(self.output, str):
            raise TaskFormatError("example input and output must be strings")
        if self.choices is not None:
            if len(self.choices) < 2:
                raise TaskFormatError("a multiple-choice example needs at least two choices")
            if self.output not in self.choices:
                raise TaskFormatError(f"example output {self.output!r} is not one of its choices")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input": self.input, "output": self.output}
        if self.choices is not None:
            data["choices"] = list(self.choices)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "example") -> Example:
        if not isinstance(data, dict):
            raise TaskFormatError(f"{where}: expected an object with 'input' and 'output'")
        missing = [key for key in ("input", "output") if key not in data]
        if missing:
            raise TaskFormatError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(data["input"], str) or not isinstance(data["output"], str):
            raise TaskFormatError(f"{where}: 'input' and 'output' must be strings")
        choices = data.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise TaskFormatError(f"{where}: 'choices' must be a list of strings")
        try:
            return cls(data["input"], data["output"], tuple(choices) if choices is not None else None)
        except TaskFormatError as exc:
            raise TaskFormatError(f"{where}: {exc}") from None


def format_prompt(text: str) -> str:
    """The prompt every part of icm-lora uses for an example's input; the answer follows as ``" " + output``."""
    return f"{INPUT_PREFIX}{text}{OUTPUT_PREFIX}"


def format_target(output: str) -> str:
    return f" {output}"


@dataclass(frozen=True)
class TaskSpec:
    """What a user gives to get an adapter: a description, examples, or both."""

    description: str = ""
    examples: tuple[Example, ...] = ()

    def __post_init__(self) -> None:
        if not self.description.strip() and not self.examples:
            raise TaskFormatError("a task needs a description or at least one example")

    def canonical_json(self) -> str:
        """Stable JSON of the spec: the same task always gives the same bytes (used in content ids)."""
        data = {"description": self.description.strip(), "examples": [e.to_dict() for e in self.examples]}
        return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    def content_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "examples": [e.to_dict() for e in self.examples]}

    @classmethod
    def from_dict(cls, data: Any) -> TaskSpec:
        if not isinstance(data, dict):
            raise TaskFormatError("a task spec must be an object with 'description' and/or 'examples'")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise TaskFormatError("'description' must be a string")
        raw = data.get("examples", [])
        if not isinstance(raw, list):
            raise TaskFormatError("'examples' must be a list")
        examples = tuple(Example.from_dict(item, f"examples[{i}]") for i, item in enumerate(raw))
        return cls(description=description, examples=examples)


@dataclass(frozen=True)
class Task:
    """A suite member. ``test`` examples are for scoring only: never for training, never for task vectors."""

    name: str
    description: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    family: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_multiple_choice(self) -> bool:
        return all(e.choices is not None for e in self.test)

    def spec(self, max_examples: int | None = None, seed: int = 0) -> TaskSpec:
        """The spec a user of this task would send: its description and (a seeded sample of) its train examples."""
        examples = list(self.train)
        if max_examples is not None and len(examples) > max_examples:
            examples = random.Random(f"{self.name}:{seed}").sample(examples, max_examples)
        return TaskSpec(description=self.description, examples=tuple(examples))


def split_examples(
    name: str, examples: Sequence[Example], test_fraction: float = 0.3, max_test: int | None = None, seed: int = 0
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Deterministic train/test split, seeded by the task name so adding tasks never reshuffles others."""
    if len(examples) < 2:
        raise TaskFormatError(f"task {name!r} needs at least 2 examples to split into train and test")
    order = list(examples)
    random.Random(f"split:{name}:{seed}").shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    if max_test is not None:
        n_test = min(n_test, max_test)
    n_test = min(n_test, len(order) - 1)
    return tuple(order[n_test:]), tuple(order[:n_test])


# --- JSONL folder -------------------------------------------------------------------------------------------------


def load_jsonl_task(path: Path, test_fraction: float = 0.3, max_test: int | None = None) -> Task:
    """One task from ``NAME.jsonl``: a header line ``{"description": ..., "family"?: ...}``, then one example per line.

    Example lines are ``{"input": str, "output": str, "choices"?: [str, ...]}``. A line with ``"split": "test"`` or
    ``"train"`` fixes that example's side; otherwise the examples are split deterministically.
    """
    name = path.stem
    header: dict[str, Any] | None = None
    fixed: dict[str, list[Example]] = {"train": [], "test": []}
    free: list[Example] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFormatError(f"{where}: invalid JSON ({exc.msg})") from None
        if header is None:
            if not isinstance(data, dict) or "description" not in data or "input" in data:
                raise TaskFormatError(f"{where}: the first line must be a header with a 'description'")
            if not isinstance(data["description"], str):
                raise TaskFormatError(f"{where}: 'description' must be a string")
            header = data
            continue
        split = data.pop("split", None) if isinstance(data, dict) else None
        example = Example.from_dict(data, where)
        if split is None:
            free.append(example)
        elif split in fixed:
            fixed[split].append(example)
        else:
            raise TaskFormatError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
    if header is None:
        raise TaskFormatError(f"{path}: empty file")
    if free:
        train, test = split_examples(name, free, test_fraction, max_test)
    else:
        train, test = (), ()
    train, test = tuple(fixed["train"]) + train, tuple(fixed["test"]) + test
    if not train or not test:
        raise TaskFormatError(f"{path}: a task needs at least one train and one test example")
    family = header.get("family", "")
    return Task(name=name, description=header["description"], train=train, test=test, family=str(family))


def load_jsonl_suite(folder: Path, test_fraction: float = 0.3, max_test: int | None = None) -> list[Task]:
    """Every ``*.jsonl`` file in ``folder`` is one task, named after the file."""
    if not folder.is_dir():
        raise TaskFormatError(f"{folder}: not a folder")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise TaskFormatError(f"{folder}: no .jsonl task files")
    return [load_jsonl_task(path, test_fraction, max_test) for path in files]


def write_jsonl_task(task: Task, folder: Path) -> Path:
    """Write a task in the JSONL format above, with its split fixed, so it loads back identically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.jsonl"
    lines = [json.dumps({"description": task.description, "family": task.family})]
    for split, examples in (("train", task.train), ("test", task.test)):
        lines += [json.dumps({**e.to_dict(), "split": split}) for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- BIG-bench ------------------------------------------------------------------------------------------------------


def load_bigbench_task(
    path: Path, name: str | None = None, test_fraction: float = 0.3, max_test: int | None = 100, max_examples: int = 0
) -> Task:
    """A task from a BIG-bench ``task.json``: multiple choice (``target_scores``) or generative (``target``).

    For multiple choice the choices are the ``target_scores`` keys and the output is the highest-scoring one.
    ``max_examples`` > 0 keeps a seeded sample of that many examples (BIG-bench tasks can have thousands).
    """
    task_name = name or path.parent.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskFormatError(f"{path}: no such BIG-bench task file") from None
    except json.JSONDecodeError as exc:
        raise TaskFormatError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise TaskFormatError(f"{path}: not a BIG-bench JSON task (no 'examples' list)")
    examples = [_bigbench_example(raw, f"{path}: examples[{i}]") for i, raw in enumerate(data["examples"])]
    if max_examples and len(examples) > max_examples:
        examples = random.Random(f"sample:{task_name}").sample(examples, max_examples)
    train, test = split_examples(task_name, examples, test_fraction, max_test)
    description = str(data.get("description", "")).strip()
    family = task_name.split("/")[0]
    return Task(task_name, description, train, test, family, metadata={"source": "bigbench"})


def _bigbench_example(raw: Any, where: str) -> Example:
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        raise TaskFormatError(f"{where}: needs a string 'input'")
    scores = raw.get("target_scores")
    if isinstance(scores, dict) and scores:
        choices = tuple(str(c) for c in scores)
        best = max(scores, key=lambda c: float(scores[c]))
        return Example(raw["input"], str(best), choices)
    target = raw.get("target")
    if isinstance(target, list) and target:
        target = target[0]
    if not isinstance(target, str):
        raise TaskFormatError(f"{where}: needs 'target_scores' or a string 'target'")
    return Example(raw["input"], target)


def load_bigbench_suite(root: Path, names: Iterable[str], **kwargs: Any) -> list[Task]:
    """Tasks by BIG-bench name (``"navigate"``, ``"bbq_lite_json/age_ambig"``) under ``root`` (the
    ``bigbench/benchmark_tasks`` folder of an extracted ``bigbench`` sdist)."""
    tasks = []
    for name in names:
        path = root / name / "task.json"
        if not path.is_file():
            raise TaskFormatError(f"BIG-bench task {name!r} not found at {path}")
        tasks.append(load_bigbench_task(path, name=name, **kwargs))
    return tasks


# --- the synthetic family -----------------------------------------------------------------------------------------

SYNTHETIC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "kiwi", "lime"),
    "animal": (
        "tiger",
        "horse",
        "zebra",
        "camel",
        "otter",
        "eagle",
        "shark",
        "whale",
        "mouse",
        "sheep",
        "goat",
        "wolf",
    ),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray", "violet", "teal"),
    "tool": (
        "hammer",
        "wrench",
        "drill",
        "chisel",
        "pliers",
        "shovel",
        "rake",
        "axe",
        "spanner",
        "ladder",
        "vice",
        "saw",
    ),
    "country": (
        "france",
        "spain",
        "italy",
        "egypt",
        "china",
        "japan",
        "brazil",
        "peru",
        "chile",
        "india",
        "kenya",
        "norway",
    ),
    "body": ("arm", "leg", "hand", "foot", "knee", "elbow", "neck", "ear", "nose", "chin", "wrist", "ankle"),
}
SYNTHETIC_LABELS: tuple[tuple[str, str], ...] = (
    ("yes", "no"),
    ("true", "false"),
    ("left", "right"),
    ("up", "down"),
    ("hot", "cold"),
    ("on", "off"),
)
SYNTHETIC_FAMILY = "word-category"


def synthetic_vocabulary() -> list[str]:
    words = [w for pool in SYNTHETIC_CATEGORIES.values() for w in pool]
    words += [label for pair in SYNTHETIC_LABELS for label in pair]
    return words + list(SYNTHETIC_CATEGORIES)


def synthetic_task(
    first: str, second: str, labels: tuple[str, str], n_train: int = 48, n_test: int = 32, words_per_input: int = 3
) -> Task:
    """Binary classification of a short list of words by category, answered with a task-specific label pair.

    Input: ``words_per_input`` words from one category; output: ``labels[0]`` for ``first``, ``labels[1]`` for
    ``second``. Tasks that share categories or labels are related, which is what a generator can learn from. Every
    word occurs in training; test inputs are new combinations of them.
    """
    if first == second or first not in SYNTHETIC_CATEGORIES or second not in SYNTHETIC_CATEGORIES:
        raise TaskFormatError(f"unknown or equal categories {first!r}, {second!r}")
    name = f"{first}-vs-{second}-{labels[0]}-{labels[1]}"
    rng = random.Random(name)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < n_train + n_test:
        category, label = (first, labels[0]) if len(examples) % 2 == 0 else (second, labels[1])
        text = " ".join(rng.sample(SYNTHETIC_CATEGORIES[category], words_per_input))
        if text in seen:
            continue
        seen.add(text)
        examples.append(Example(text, label, labels))
    description = (
        f"Decide whether the listed words are {_plural(first)} or {_plural(second)}. "
        f"Answer '{labels[0]}' for {_plural(first)} and '{labels[1]}' for {_plural(second)}."
    )
    order = examples[:]
    rng.shuffle(order)
    return Task(
        name=name,
        description=description,
        train=tuple(order[:n_train]),
        test=tuple(order[n_train:]),
        family=SYNTHETIC_FAMILY,
        metadata={"categories": [first, second], "labels": list(labels)},
    )


def _plural(category: str) -> str:
    return {"body": "body parts", "country": "countries"}.get(category, f"{category}s")


def synthetic_suite(n_tasks: int, seed: int = 0, **kwargs: Any) -> list[Task]:
    """``n_tasks`` distinct tasks of the synthetic family, a seeded draw over (category pair, label pair)."""
    categories = list(SYNTHETIC_CATEGORIES)
    combos = [(a, b, labels) for a in categories for b in categories if a != b for labels in SYNTHETIC_LABELS]
    if not 1 <= n_tasks <= len(combos):
        raise TaskFormatError(f"the synthetic family has {len(combos)} tasks; asked for {n_tasks}")
    random.Random(seed).shuffle(combos)
    return [synthetic_task(a, b, labels, **kwargs) for a, b, labels in combos[:n_tasks]]
