"""Long prompts are prefilled chunk by chunk between decode steps: same greedy tokens as peft, and running streams
keep decoding while a long prompt is read."""

from __future__ import annotations

from collections.abc import Callable

from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, SamplingParams
from tests.engine.conftest import MakeAdapter, Reference, StepObserver


def test_chunked_prompts_match_peft_alone_and_in_a_mixed_batch(
    make_engine: Callable[..., Engine],
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
) -> None:
    engine = make_engine(num_slots=4, prefill_chunk=3)  # every prompt but the shortest is read in chunks
    long_prompt = [t for ids in prompt_ids for t in ids]  # many chunks
    assert engine.generate(long_prompt, adapter=adapter(1), max_tokens=8).token_ids == reference(
        long_prompt, adapter(1), 8
    )
    prompts = [long_prompt, prompt_ids[2], prompt_ids[3], prompt_ids[0], prompt_ids[1]]
    adapters = [adapter(2), None, adapter(1), adapter(3), None]
    results = engine.generate_many(prompts, adapters, SamplingParams(max_tokens=10))
    for ids, a, result in zip(prompts, adapters, results, strict=True):
        assert result.token_ids == reference(ids, a, 10)
        assert result.prompt_tokens == len(ids)


def test_running_streams_keep_decoding_while_a_long_prompt_is_read(
    adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    observer = StepObserver()
    engine = Engine(load_base_model("tiny"), EngineConfig(num_slots=4, prefill_chunk=4), observer)
    try:
        running = engine.submit(prompt_ids[2], params=SamplingParams(max_tokens=400, ignore_eos=True))
        stream = iter(running)
        next(stream)  # it runs
        long_prompt = [t for _ in range(3) for ids in prompt_ids for t in ids]
        chunks = -(-len(long_prompt) // 4)
        late = engine.submit(long_prompt, adapter=adapter(2), params=SamplingParams(max_tokens=5))
        result = late.result()
        rest = list(stream)
    finally:
        engine.close()
    assert result.token_ids == reference(long_prompt, adapter(2), 5)
    assert rest[-1].finish_reason == "length"
    prefills = [i for i, (kind, _) in enumerate(observer.events) if kind == "prefill"]
    chunk_events = prefills[1:]  # the first one is the running request's own prefill
    assert len(chunk_events) == chunks  # the long prompt went in chunks of at most 4 tokens
    assert all(observer.events[i][1] == (1, 4) for i in chunk_events[:-1])
    between = observer.events[chunk_events[0] : chunk_events[-1]]
    assert sum(1 for kind, _ in between if kind == "decode") >= chunks - 1  # a decode step after every chunk


def test_kv_budget_decides_admission(
    adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]], tokenizer
) -> None:  # type: ignore[no-untyped-def]
    from service.engine import RequestTooLarge
    from service.engine.scheduler import kv_bytes_per_token

    base = load_base_model("tiny")
    per_token = kv_bytes_per_token(base.model)
    longest = max(prompt_ids, key=len)
    reach = len(longest) + 6
    observer = StepObserver()
    # room for two of these requests at a time, never three
    engine = Engine(base, EngineConfig(num_slots=4, kv_cache_bytes=per_token * (2 * reach + reach // 2)), observer)
    try:
        adapters = [adapter(1), None, adapter(2), adapter(3)]
        results = engine.generate_many([longest] * 4, adapters, SamplingParams(max_tokens=6, ignore_eos=True))
        for a, result in zip(adapters, results, strict=True):
            assert result.token_ids[: len(reference(longest, a, 6))] == reference(longest, a, 6)
        assert max(observer.batch_sizes) == 2  # the others waited for rows to leave
        try:
            engine.submit(prompt_ids[0], params=SamplingParams(max_tokens=3 * reach))
        except RequestTooLarge as exc:
            assert "budget" in str(exc)
        else:
            raise AssertionError("a request that can never fit was queued")
    finally:
        engine.close()
