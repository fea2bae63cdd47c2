"""The service's self-check keeps the base model's scores of a set of examples: a second check of the same examples
(a refined or regenerated adapter, another spec with those examples) scores only the adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.batching import AnswerGroup
from generator.config import LoraSettings
from generator.tasks import Example, TaskSpec
from service.selfcheck import AdapterChecker, BaseScores
from tests.engine.conftest import make_adapter

EXAMPLES = tuple(Example(f"word {i}", "yes" if i % 2 else "no", choices=("yes", "no")) for i in range(4))


class CountingScorer:
    """Deterministic fake scores per (answer, adapter); records what each call was asked to score."""

    def __init__(self) -> None:
        self.calls: list[list[str | None]] = []

    def __call__(self, groups: Sequence[AnswerGroup], adapters: Sequence[GeneratedAdapter | None]) -> torch.Tensor:
        self.calls.append([None if a is None else a.adapter_id for a in adapters])
        answers = [a for g in groups for a in g.answers]
        rows = []
        for adapter in adapters:
            salt = 0 if adapter is None else sum(map(ord, adapter.adapter_id))
            rows.append(torch.tensor([-(((sum(a) + salt) % 97) / 50.0) for a in answers]))
        return torch.stack(rows)


def test_a_second_check_of_the_same_examples_scores_only_the_adapter() -> None:
    tokenizer = load_base_model("tiny").tokenizer
    inner = CountingScorer()
    checker = AdapterChecker(inner, tokenizer, read=8, max_length=48, margin=0.0)
    plain = AdapterChecker(CountingScorer(), tokenizer, read=8, max_length=48, margin=0.0)
    spec = TaskSpec("d", EXAMPLES)
    first, second = make_adapter(1, LoraSettings()), make_adapter(2, LoraSettings())
    a = checker(spec, first)
    b = checker(TaskSpec("another description, the same examples", EXAMPLES), second)
    assert inner.calls == [[None, first.adapter_id], [second.adapter_id]]
    assert isinstance(checker.scorer, BaseScores) and checker.scorer.hits_total == 1
    assert a is not None and b is not None and a.base == b.base and a.base_correct == b.base_correct
    assert b == plain(spec, second)  # the same check as without the cache
    checker(TaskSpec("d", EXAMPLES[:3]), second)  # other examples: the base model is scored again
    assert inner.calls[-1] == [None, second.adapter_id]


def test_the_cache_is_bounded() -> None:
    inner = CountingScorer()
    scores = BaseScores(inner, entries=1)
    one, two = (AnswerGroup((1, 2), ((3,), (4,))),), (AnswerGroup((1, 5), ((6,),)),)
    scores(one, [None])
    scores(two, [None])  # drops one
    scores(one, [None])
    assert inner.calls == [[None], [None], [None]] and scores.hits_total == 0
    scores(one, [None])
    assert len(inner.calls) == 3 and scores.hits_total == 1
