"""Suite selection: candidate rules on task files made here, and the choice of training and held-out tasks."""

from __future__ import annotations

import json
from pathlib import Path

from generator.training.pipeline import read_names_file
from generator.training.suite_selection import (
    PilotRow,
    choose,
    find_candidates,
    read_pilot,
    remaining_tasks,
    split_families,
    validation_tasks,
    write_augmented_suite,
    write_suite,
    write_validation_suite,
)


def _task(root: Path, name: str, examples: list[dict[str, object]], keywords: list[str] | None = None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    data = {"description": f"about {name}", "keywords": keywords or [], "examples": examples}
    (folder / "task.json").write_text(json.dumps(data))


def _mc(n: int, text: str = "question {i}") -> list[dict[str, object]]:
    return [{"input": text.format(i=i), "target_scores": {"yes": 1, "no": 0}} for i in range(n)]


def _gen(n: int, answer: str = "short") -> list[dict[str, object]]:
    return [{"input": f"question {i}", "target": [answer]} for i in range(n)]


def test_candidates_follow_the_rules(tmp_path: Path) -> None:
    _task(tmp_path, "good_mc", _mc(50))
    _task(tmp_path, "good_gen", _gen(50))
    _task(tmp_path, "too_few", _mc(10))
    _task(tmp_path, "long_answers", _gen(50, "a rather long answer that goes on and on"))
    _task(tmp_path, "long_inputs", _mc(50, "x" * 500 + " {i}"))
    _task(tmp_path, "other_language", _mc(50), keywords=["non-English"])
    _task(tmp_path, "other_script", _mc(50, "प्रश्न संख्या {i}"))
    _task(tmp_path, "family/sub_en", _mc(50), keywords=["multilingual", "non-English"])
    _task(tmp_path, "family/sub_pl", _mc(50), keywords=["multilingual", "non-English"])
    _task(tmp_path, "parent", _mc(50))
    _task(tmp_path, "parent/child", _gen(50))
    for i in range(5):
        _task(tmp_path, f"big/sub{i}", _mc(50))
    found = find_candidates(tmp_path, per_family=3)
    names = [c.name for c in found]
    assert {"good_mc", "good_gen", "family/sub_en", "parent/child"} <= set(names)
    assert not {"too_few", "long_answers", "long_inputs", "other_language", "other_script", "family/sub_pl"} & set(
        names
    )
    assert "parent" not in names  # represented by its subtask
    assert sum(n.startswith("big/") for n in names) == 3
    assert found == find_candidates(tmp_path, per_family=3)  # seeded: the same choice every time
    every = find_candidates(tmp_path)  # the default: every qualifying subtask
    assert sum(c.name.startswith("big/") for c in every) == 5 and set(names) <= {c.name for c in every}
    kinds = {c.name: c.kind for c in found}
    assert kinds["good_mc"] == "multiple_choice" and kinds["good_gen"] == "generative"


def _row(task: str, lift: float, kind: str = "multiple_choice", description: str = "") -> PilotRow:
    family = task.split("/")[0]
    return PilotRow(task, family, kind, description or f"about {task}", 0.3, 0.3 + lift, 24, 1.0, {})


def test_choice_keeps_lifted_tasks_and_holds_out_whole_families(tmp_path: Path) -> None:
    rows = [
        _row(f"fam{f}/t{t}", 0.1, "generative" if f % 3 == 0 else "multiple_choice")
        for f in range(36)
        for t in range(4)
    ]
    rows += [_row("flat/t0", 0.0), _row("flat/t1", 0.04)]
    rows += [_row(f"bbq/t{t}", 0.2, description="shared") for t in range(4)]
    selection = choose(rows, min_lift=0.05, held_out_tasks=12, held_out_families=8, seed=0)
    held_families = set(selection.held_out_families)
    assert len(held_families) >= 8 and len(selection.held_out) >= 12
    assert not any(r.family in held_families for r in selection.train)
    assert not any(r.task.startswith("flat/") for r in selection.train + selection.held_out)
    assert {r.kind for r in selection.held_out} == {"multiple_choice", "generative"}
    if "bbq" not in held_families:
        assert len(selection.shared_description_held_out) == 1
        assert any(r.family == "bbq" for r in selection.train)
    assert selection.problems(min_train=80) == []
    assert choose(rows, seed=0) == selection
    assert choose(rows, seed=1).held_out_families != selection.held_out_families
    suite = tmp_path / "suite.txt"
    write_suite(selection, suite, "test suite")
    names, unseen = read_names_file(suite)
    assert sorted(unseen) == sorted(r.task for r in selection.held_out)
    assert len(names) == len(selection.train) + len(selection.held_out)


def test_problems_name_what_is_short() -> None:
    selection = choose([_row(f"f{f}/t", 0.1) for f in range(12)], held_out_tasks=2, held_out_families=2)
    problems = " ".join(selection.problems())
    assert "training tasks" in problems and "generative share" in problems and "held-out tasks are only" in problems


def test_pilot_rows_round_trip(tmp_path: Path) -> None:
    row = _row("fam/t", 0.25)
    (tmp_path / "fam__t.json").write_text(json.dumps(row.to_dict()))
    assert read_pilot(tmp_path) == [row]
    assert row.to_dict()["lift"] == 0.25


def test_validation_suite_takes_only_families_the_suite_lacks(tmp_path: Path) -> None:
    """The self-check's validation tasks come from families neither trained on nor held out, so a rule about
    generated adapters can be checked on tasks that played no part in choosing it; the file is a valid suite."""
    rows = [_row("fam_a/x", 0.2), _row("fam_b/y", -0.1), _row("fam_c", 0.0, "generative"), _row("fam_d/z", 0.0)]
    chosen = validation_tasks(rows, ["fam_a/x", "fam_b/other"])
    assert [r.task for r in chosen] == ["fam_c", "fam_d/z"]
    path = tmp_path / "validation.txt"
    write_validation_suite(["fam_a/x"], chosen, path, "header")
    names, unseen = read_names_file(path)
    assert names == ["fam_a/x", "fam_c", "fam_d/z"] and unseen == ["fam_c", "fam_d/z"]
    assert "# validation: 2 tasks (1 generative) from 2 families" in path.read_text()


def test_remaining_tasks_are_the_unlisted_members_of_the_suites_families(tmp_path: Path) -> None:
    """The complement of the validation tasks: families the suite has, tasks it does not list."""
    rows = [_row("fam_a/x", 0.2), _row("fam_a/y", 0.0), _row("fam_b/other", 0.1), _row("fam_c", 0.0, "generative")]
    suite = ["fam_a/x", "fam_b/other"]
    chosen = remaining_tasks(rows, suite)
    assert [r.task for r in chosen] == ["fam_a/y"]
    assert not {r.task for r in chosen} & {r.task for r in validation_tasks(rows, suite)}
    path = tmp_path / "remaining.txt"
    write_validation_suite(suite, chosen, path, "header", label="remaining")
    assert read_names_file(path) == (["fam_a/x", "fam_b/other", "fam_a/y"], ["fam_a/y"])
    assert "# remaining: 1 tasks (0 generative) from 1 families" in path.read_text()


def test_augmented_suite_trains_on_whole_families_and_keeps_the_held_out_tasks(tmp_path: Path) -> None:
    rows = [_row(f"fam_{f}/t{i}", 0.0) for f in "abcdef" for i in range(2)]
    extra, rest = split_families(rows, 0.5, seed=0)
    assert len(extra) == len(rest) == 6
    assert not {r.family for r in extra} & {r.family for r in rest}  # whole families on one side
    assert split_families(rows, 0.5, seed=0) == (extra, rest)  # reproducible
    path = tmp_path / "augmented.txt"
    write_augmented_suite(["x/1", "x/2"], extra, ["y/1"], path, "header")
    names, unseen = read_names_file(path)
    assert names == ["x/1", "x/2", *(r.task for r in extra), "y/1"] and unseen == ["y/1"]
