"""Engine.answer_logprobs: the self-check's scorer on the resident model (base and adapter rows in one pass) equals
the offline one (plain peft, one pass per adapter)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from generator.base_model import load_base_model
from generator.batching import group_length
from generator.config import LoraSettings
from generator.lora_model import LoraModel
from generator.selfcheck import LoraModelScorer, encode_groups
from generator.tasks import Example
from service.engine import Engine
from service.engine.scoring import budget_batches
from tests.engine.conftest import MakeAdapter

EXAMPLES = [
    Example("red green blue", "blue green red", ("blue green red", "red", "green blue")),
    Example("one two", "two one", ("one", "two one")),
    Example("a much longer input with many more words in it than the others", "it", ("it", "them", "words")),
    Example("x", "y z w", ("y z w", "x")),
]


def test_engine_scores_equal_lora_model_scorer(make_engine: Callable[..., Engine], adapter: MakeAdapter) -> None:
    engine = make_engine(num_slots=2)
    tokenizer = load_base_model("tiny").tokenizer
    groups = encode_groups(tokenizer, EXAMPLES, max_length=48, choices=True)
    answers = sum(len(g.answers) for g in groups)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    small = LoraSettings(rank=2, alpha=4.0)
    references = {
        settings: LoraModelScorer(LoraModel(load_base_model("tiny").model, settings), pad, batch_size=3)
        for settings in (LoraSettings(), small)
    }
    first, second, third = adapter(1), adapter(2), adapter(3, small)
    for candidate in (first, second, third, first):  # swaps and evictions (2 slots), each beside the base model
        got = engine.answer_logprobs(groups, [None, candidate], budget=64)  # in several passes
        want = references[candidate.lora](groups, [None, candidate])
        assert got.shape == (2, answers)
        assert torch.allclose(got, want, atol=1e-4), (candidate.adapter_id, got, want)
    assert not torch.allclose(got[0], got[1], atol=1e-3)
    both = engine.answer_logprobs(groups, [first, second])  # two adapters in one pass, on two slots
    assert torch.allclose(both[0], references[first.lora](groups, [first])[0], atol=1e-4)
    assert torch.allclose(both[1], references[second.lora](groups, [second])[0], atol=1e-4)


def test_scoring_between_generations_leaves_them_unchanged(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, prompt_ids: list[list[int]]
) -> None:
    engine = make_engine(num_slots=2)
    tokenizer = load_base_model("tiny").tokenizer
    groups = encode_groups(tokenizer, EXAMPLES[:2], max_length=32, choices=False)
    a = adapter(5)
    before = engine.generate(prompt_ids[0], a, max_tokens=6, temperature=0).token_ids
    handle = engine.submit(prompt_ids[1], a, max_tokens=12, temperature=0)
    scored = engine.answer_logprobs(groups, [None, adapter(6)])  # runs between decode steps of the request above
    assert scored.shape == (2, 2) and bool(torch.isfinite(scored).all())
    alone = engine.generate(prompt_ids[1], a, max_tokens=12, temperature=0).token_ids
    assert handle.result().token_ids == alone
    assert engine.generate(prompt_ids[0], a, max_tokens=6, temperature=0).token_ids == before


def test_budget_batches_keep_order_and_stay_within_the_budget() -> None:
    tokenizer = load_base_model("tiny").tokenizer
    groups = encode_groups(tokenizer, EXAMPLES * 3, max_length=48, choices=True)
    for copies, budget in ((1, 40), (2, 64), (3, 1), (2, 10**6)):
        runs = budget_batches(groups, copies, budget)
        assert [g for run in runs for g in run] == groups
        assert all(len(run) == 1 or sum(group_length(g) for g in run) * copies <= budget for run in runs)
        assert all(sum(group_length(g) for g in (*a, b[0])) * copies > budget for a, b in itertools.pairwise(runs))
    assert len(budget_batches(groups, 2, 10**6)) == 1 and len(budget_batches(groups, 3, 1)) == len(groups)
