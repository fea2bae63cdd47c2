"""The sampler's penalties, logit bias and log-probabilities: on plain tensors, and through the engine (a mixed batch
whose per-token log-probabilities, taken in the decode step, equal a scoring pass over the same tokens)."""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine, RequestError, SamplingParams
from service.engine.sampling import choose_tokens, token_logprobs
from tests.engine.conftest import MakeAdapter


def test_penalties_and_bias_change_the_choice_and_leave_the_logits_alone() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.5], [0.0, 1.0, 3.0, 2.5]])
    before = logits.clone()
    plain = SamplingParams()
    assert choose_tokens(logits, [plain, plain], [None, None]).tolist() == [2, 2]
    # token 2 generated twice: frequency 0.3 takes 0.6 off (2.4 < 2.5); frequency 0.2 only 0.4 (2.6 stays on top)
    frequency, weak = SamplingParams(frequency_penalty=0.3), SamplingParams(frequency_penalty=0.2)
    presence = SamplingParams(presence_penalty=0.6)  # once, however often the token came: 2.4 < 2.5
    assert choose_tokens(logits, [frequency, plain], [None, None], [[2, 2], [2, 2]]).tolist() == [3, 2]
    assert choose_tokens(logits, [weak, presence], [None, None], [[2, 2], [2, 2]]).tolist() == [2, 3]
    bias = SamplingParams(logit_bias=((0, 10.0),))
    assert choose_tokens(logits, [bias, plain], [None, None]).tolist() == [0, 2]
    sampled = SamplingParams(temperature=1.0, logit_bias=((1, 100.0),))
    generator = torch.Generator().manual_seed(0)
    assert choose_tokens(logits, [sampled, plain], [generator, None]).tolist() == [1, 2]
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_choice_in_low_precision_is_the_low_precision_argmax(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4096, generator=generator).to(dtype)
    logits[3, 100] = logits[3, 2000] = logits[3].max() + 1  # a tie: the first maximum wins, as the low dtype's argmax
    logits[5, 7] = logits[5, 9] = 40.0
    logits[5, 8] = 40.0 - 0.1  # rounds to 40 in bf16 (a tie there), not in fp16: either way the low dtype decides
    plain = SamplingParams()
    tokens = choose_tokens(logits, [plain] * 16, [None] * 16)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert tokens[3] == 100 and tokens[5] == 7


def test_token_logprobs_only_for_the_rows_that_ask() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.5], [2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(), SamplingParams(logprobs=2)]
    found = token_logprobs(logits, params, [2, 1])
    assert found[0] is None and found[1] is not None
    expected = torch.log_softmax(logits[1], dim=-1)
    assert found[1].token == 1 and found[1].logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in found[1].top] == [0, 1]
    assert [lp for _, lp in found[1].top] == pytest.approx(expected[:2].tolist())
    assert token_logprobs(logits, [SamplingParams()] * 2, [2, 1]) == [None, None]


def test_bad_settings_are_refused() -> None:
    for bad in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"logit_bias": ((5, 101.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"logprobs": 21},
    ):
        with pytest.raises(RequestError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_engine_refuses_a_bias_outside_the_vocabulary(engine: Engine, prompt_ids: list[list[int]]) -> None:
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit(prompt_ids[0], params=SamplingParams(logit_bias=((engine.vocab_size, 1.0),)))
    last = engine.vocab_size - 1
    result = engine.generate(prompt_ids[0], params=SamplingParams(max_tokens=3, logit_bias=((last, 100.0),)))
    assert result.token_ids == [last] * 3


def test_decode_step_logprobs_equal_a_scoring_pass(
    make_engine, adapter: MakeAdapter, prompt_ids: list[list[int]]
) -> None:  # type: ignore[no-untyped-def]
    engine: Engine = make_engine(num_slots=2)
    a = adapter(7)
    asked = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    plain = SamplingParams(max_tokens=9, temperature=0.7, seed=1)
    results = engine.generate_many([prompt_ids[0], prompt_ids[1], prompt_ids[2]], [a, None, a], [asked, plain, asked])
    assert results[1].logprobs is None
    for result, prompt in ((results[0], prompt_ids[0]), (results[2], prompt_ids[2])):
        assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) == 6
        scored = engine.prompt_logprobs([*prompt, *result.token_ids], a, top_k=3)[len(prompt) - 1 :]
        for step, (got, want) in enumerate(zip(result.logprobs, scored, strict=True)):
            assert got.token == want.token == result.token_ids[step]
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            assert got.top[0][1] == pytest.approx(got.logprob, abs=1e-6)  # greedy: the most likely token
    base = engine.prompt_logprobs([*prompt_ids[0], *results[0].token_ids], None)[len(prompt_ids[0]) - 1 :]
    assert [e.logprob for e in base] != pytest.approx([e.logprob for e in results[0].logprobs], abs=1e-3)


def test_a_bias_against_the_eos_ids_keeps_a_request_writing(engine: Engine, prompt_ids: list[list[int]]) -> None:
    """``Engine.eos_token_ids`` names the tokens that end a request; biased away, greedy decoding writes to the limit
    (what ``bench/service.py`` relies on, since task adapters stop after their answer)."""
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids
    eos = next(iter(engine.eos_token_ids))
    forced = SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((eos, 100.0),))
    assert engine.generate(prompt_ids[0], params=forced).finish_reason == "stop"  # EOS is an end
    away = SamplingParams(max_tokens=6, temperature=0.0, logit_bias=tuple((t, -100.0) for t in engine.eos_token_ids))
    result = engine.generate(prompt_ids[0], params=away)
    assert result.finish_reason == "length" and len(result.token_ids) == 6
    assert not set(result.token_ids) & engine.eos_token_ids
