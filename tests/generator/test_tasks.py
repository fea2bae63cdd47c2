from __future__ import annotations

import json
from pathlib import Path

import pytest

from generator.tasks import (
    Example,
    Task,
    TaskFormatError,
    TaskSpec,
    load_bigbench_suite,
    load_bigbench_task,
    load_jsonl_suite,
    load_jsonl_task,
    split_examples,
    synthetic_suite,
    synthetic_task,
    write_jsonl_task,
)


def test_spec_needs_description_or_examples() -> None:
    with pytest.raises(TaskFormatError, match="description or at least one example"):
        TaskSpec(description="   ")
    assert TaskSpec(description="x").examples == ()
    assert TaskSpec(examples=(Example("a", "b"),)).description == ""


def test_canonical_json_ignores_surrounding_whitespace_and_key_order() -> None:
    a = TaskSpec.from_dict({"description": " Sort words ", "examples": [{"output": "b", "input": "a"}]})
    b = TaskSpec.from_dict({"examples": [{"input": "a", "output": "b"}], "description": "Sort words"})
    assert a.canonical_json() == b.canonical_json()
    assert a.content_hash() == b.content_hash()
    c = TaskSpec.from_dict({"description": "Sort words", "examples": [{"input": "a", "output": "c"}]})
    assert c.content_hash() != a.content_hash()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be an object"),
        ({"description": 3}, "'description' must be a string"),
        ({"examples": {}}, "'examples' must be a list"),
        ({"examples": [{"input": "a"}]}, r"examples\[0\]: missing output"),
        ({"examples": [{"input": "a", "output": 1}]}, "must be strings"),
        ({"examples": [{"input": "a", "output": "b", "choices": ["c", "d"]}]}, "not one of its choices"),
        ({"examples": [{"input": "a", "output": "b", "choices": ["b"]}]}, "at least two choices"),
    ],
)
def test_spec_from_dict_rejects_bad_input(data: object, message: str) -> None:
    with pytest.raises(TaskFormatError, match=message):
        TaskSpec.from_dict(data)


def test_split_is_deterministic_disjoint_and_keyed_by_name() -> None:
    examples = [Example(str(i), str(i)) for i in range(20)]
    train, test = split_examples("t", examples, test_fraction=0.25)
    assert (train, test) == split_examples("t", examples, test_fraction=0.25)
    assert len(test) == 5 and len(train) == 15
    assert not {e.input for e in train} & {e.input for e in test}
    assert split_examples("other", examples, 0.25)[1] != test
    with pytest.raises(TaskFormatError, match="at least 2 examples"):
        split_examples("t", examples[:1])


def test_task_spec_uses_train_examples_only() -> None:
    task = synthetic_task("fruit", "animal", ("yes", "no"))
    test_inputs = {e.input for e in task.test}
    for seed in range(3):
        spec = task.spec(max_examples=8, seed=seed)
        assert len(spec.examples) == 8
        assert not {e.input for e in spec.examples} & test_inputs
    assert task.spec(8, seed=0) == task.spec(8, seed=0)
    assert task.spec(8, seed=0) != task.spec(8, seed=1)


def test_synthetic_family_is_related_and_learnable_in_principle() -> None:
    suite = synthetic_suite(12)
    assert len({t.name for t in suite}) == 12
    for task in suite:
        assert task.is_multiple_choice
        assert not {e.input for e in task.train} & {e.input for e in task.test}
        labels = set(task.metadata["labels"])
        assert {e.output for e in task.test} == labels
        # every test word also occurs in training: test inputs are new combinations of known words
        train_words = {w for e in task.train for w in e.input.split()}
        assert {w for e in task.test for w in e.input.split()} <= train_words
    shared = [
        (a.name, b.name)
        for i, a in enumerate(suite)
        for b in suite[i + 1 :]
        if set(a.metadata["categories"]) & set(b.metadata["categories"]) or a.metadata["labels"] == b.metadata["labels"]
    ]
    assert shared, "tasks of the family must share categories or labels"
    assert synthetic_suite(12) == suite
    with pytest.raises(TaskFormatError, match="has 180 tasks"):
        synthetic_suite(1000)


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_jsonl_task_round_trip(tmp_path: Path) -> None:
    task = synthetic_task("color", "tool", ("up", "down"), n_train=10, n_test=4)
    path = write_jsonl_task(task, tmp_path)
    loaded = load_jsonl_task(path)
    assert (loaded.name, loaded.description, loaded.train, loaded.test) == (
        task.name,
        task.description,
        task.train,
        task.test,
    )
    assert load_jsonl_suite(tmp_path)[0].name == task.name


def test_jsonl_task_free_split(tmp_path: Path) -> None:
    rows: list[object] = [{"description": "Echo the input."}]
    rows += [{"input": f"w{i}", "output": f"w{i}"} for i in range(10)]
    task = load_jsonl_task(_write(tmp_path / "echo.jsonl", rows), test_fraction=0.3)
    assert task.name == "echo" and len(task.test) == 3 and len(task.train) == 7
    assert not task.is_multiple_choice


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty file"),
        (['{"input": "a", "output": "b"}'], "first line must be a header"),
        ([{"description": "d"}, "{not json"], r"bad\.jsonl:2: invalid JSON"),
        ([{"description": "d"}, {"input": "a"}], r"bad\.jsonl:2: missing output"),
        ([{"description": "d"}, {"input": "a", "output": "b", "split": "dev"}], "'split' must be"),
        ([{"description": "d"}, {"input": "a", "output": "b", "split": "train"}], "at least one train and one test"),
        ([{"description": ["d"]}], "'description' must be a string"),
    ],
)
def test_jsonl_bad_files_give_clear_errors(tmp_path: Path, lines: list[object], message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", lines) if lines else tmp_path / "bad.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(TaskFormatError, match=message):
        load_jsonl_task(path)


def test_jsonl_suite_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskFormatError, match="not a folder"):
        load_jsonl_suite(tmp_path / "missing")
    with pytest.raises(TaskFormatError, match=r"no \.jsonl task files"):
        load_jsonl_suite(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TaskFormatError, match="not UTF-8"):
        load_jsonl_suite(tmp_path)


def _bigbench(tmp_path: Path, name: str, data: object) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(data))
    return folder / "task.json"


def test_bigbench_multiple_choice_and_generative(tmp_path: Path) -> None:
    mc = {
        "description": "Pick the larger number.",
        "examples": [{"input": f"{i} or {i + 1}", "target_scores": {str(i): 0, str(i + 1): 1}} for i in range(10)],
    }
    gen = {"description": "Copy.", "examples": [{"input": f"x{i}", "target": [f"x{i}", "alt"]} for i in range(6)]}
    _bigbench(tmp_path, "larger", mc)
    _bigbench(tmp_path, "family/copy", gen)
    larger, copy = load_bigbench_suite(tmp_path, ["larger", "family/copy"])
    assert larger.is_multiple_choice and larger.description == "Pick the larger number."
    for example in larger.train + larger.test:
        assert example.choices is not None and example.output == max(example.choices, key=int)
    assert not copy.is_multiple_choice and copy.family == "family"
    assert all(e.output == e.input for e in copy.train + copy.test)
    sampled = load_bigbench_task(tmp_path / "larger" / "task.json", max_examples=4)
    assert len(sampled.train) + len(sampled.test) == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"description": "d"}, "no 'examples' list"),
        ({"examples": [{"target": "a"}, {"input": "b", "target": "c"}]}, r"examples\[0\]: needs a string 'input'"),
        ({"examples": [{"input": "a"}, {"input": "b", "target": "c"}]}, "needs 'target_scores' or a string 'target'"),
    ],
)
def test_bigbench_bad_files(tmp_path: Path, data: object, message: str) -> None:
    path = _bigbench(tmp_path, "bad", data)
    with pytest.raises(TaskFormatError, match=message):
        load_bigbench_task(path)


def test_bigbench_missing_task_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(TaskFormatError, match="not found"):
        load_bigbench_suite(tmp_path, ["nope"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text("{")
    with pytest.raises(TaskFormatError, match="invalid JSON"):
        load_bigbench_task(tmp_path / "broken" / "task.json")


def test_task_is_frozen() -> None:
    task = Task("t", "d", (Example("a", "b"),), (Example("c", "d"),))
    with pytest.raises(AttributeError):
        task.name = "u"  # type: ignore[misc]
