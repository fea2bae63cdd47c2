"""Greedy outputs equal plain transformers/peft: alone, in mixed batches, across joins, leaves and hot swaps."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from generator.adapter import GeneratedAdapter
from generator.config import LoraSettings
from service.engine import Engine, SamplingParams
from tests.engine.conftest import MakeAdapter, RecordingObserver, Reference


def test_single_requests_match_peft_and_the_base_model(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    a = adapter(1)
    for ids in prompt_ids[:2]:
        with_adapter = engine.generate(ids, adapter=a, max_tokens=12)
        assert with_adapter.token_ids == reference(ids, a, 12)
        plain = engine.generate(ids, max_tokens=12)
        assert plain.token_ids == reference(ids, None, 12)
        assert with_adapter.token_ids != plain.token_ids  # the adapter really is applied
    assert engine.generate(prompt_ids[0], adapter=a, max_tokens=12).token_ids == reference(prompt_ids[0], a, 12)


def test_mixed_batch_of_adapters_and_prompt_lengths(
    engine: Engine,
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    observer: RecordingObserver,
) -> None:
    adapters = [adapter(1), adapter(2), None, adapter(3), adapter(1), adapter(11, LoraSettings(rank=2, alpha=4.0))]
    prompts = [prompt_ids[0], prompt_ids[1], prompt_ids[2], prompt_ids[3], prompt_ids[3], prompt_ids[1]]
    max_tokens = [12, 5, 12, 9, 12, 7]  # rows leave the batch at different steps
    params = [SamplingParams(max_tokens=n) for n in max_tokens]
    results = engine.generate_many(prompts, adapters, params)
    assert max(observer.batch_sizes) == len(prompts)  # they really ran as one batch
    for ids, a, n, result in zip(prompts, adapters, max_tokens, results, strict=True):
        assert result.token_ids == reference(ids, a, n)
        assert result.adapter_id == (None if a is None else a.adapter_id)


def test_requests_join_and_leave_a_running_batch(
    engine: Engine,
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    observer: RecordingObserver,
) -> None:
    b, c = adapter(2), adapter(3)
    long_ids, a = _runs_without_eos(reference, prompt_ids, [adapter(s) for s in (1, 4, 5, 6)], 30)
    first = engine.submit(long_ids, adapter=a, params=SamplingParams(max_tokens=30))
    stream = iter(first)
    for _ in range(4):
        next(stream)
    with engine.paused():  # first has 26 tokens to go; the newcomers are admitted together when the loop resumes
        late = engine.submit_many(
            [prompt_ids[0], prompt_ids[2]], [b, None], [SamplingParams(max_tokens=6), SamplingParams(max_tokens=12)]
        )
    results = [handle.result() for handle in late]
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert first.result().token_ids == reference(long_ids, a, 30)
    assert results[0].token_ids == reference(prompt_ids[0], b, 6)
    assert results[1].token_ids == reference(prompt_ids[2], None, 12)
    assert 3 in observer.batch_sizes and observer.batch_sizes[0] == 1
    # a fourth request after the others left
    assert engine.generate(prompt_ids[1], adapter=c, max_tokens=8).token_ids == reference(prompt_ids[1], c, 8)


def _runs_without_eos(
    reference: Reference, prompts: list[list[int]], adapters: list[GeneratedAdapter], n: int
) -> tuple[list[int], GeneratedAdapter]:
    """A (prompt, adapter) whose reference generation does not stop at EOS within n tokens."""
    for a in adapters:
        for ids in prompts:
            if len(reference(ids, a, n)) == n:
                return ids, a
    raise AssertionError("every candidate stops early; pick other seeds")


def test_hot_swap_while_others_run_does_not_touch_them(
    make_engine: Callable[..., Engine],
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    observer: RecordingObserver,
) -> None:
    engine = make_engine(num_slots=2)
    x, y, z = adapter(21), adapter(22), adapter(23)
    outputs = {name: reference(prompt_ids[1], ad, 10) for name, ad in (("x", x), ("y", y), ("z", z))}
    assert len({tuple(v) for v in outputs.values()}) == 3  # recognisably different adapters
    with engine.paused():
        long_x, short_y, waits_z = engine.submit_many(
            [prompt_ids[1], prompt_ids[1], prompt_ids[1]],
            [x, y, z],
            [SamplingParams(max_tokens=10), SamplingParams(max_tokens=3), SamplingParams(max_tokens=10)],
        )
    assert long_x.result().token_ids == outputs["x"]
    assert short_y.result().token_ids == outputs["y"][:3]
    assert waits_z.result().token_ids == outputs["z"]
    # z waited for y's slot, was swapped in while x was still running, and evicted y (not x)
    assert observer.events.index(("done", short_y.request_id)) < observer.events.index(
        ("swap", (z.adapter_id, 1, y.adapter_id))
    )
    assert observer.events.index(("swap", (z.adapter_id, 1, y.adapter_id))) < observer.events.index(
        ("done", long_x.request_id)
    )
    stats = engine.stats(sync=True)
    assert stats.swaps_total == 3 and stats.slots_pinned == 0 and stats.adapters_resident == 2


def test_many_requests_over_few_slots_never_mix_adapters(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    engine = make_engine(num_slots=3, max_batch_size=4)
    adapters = [adapter(30 + i) for i in range(5)] + [None]
    jobs = [(prompt_ids[i % 4], adapters[(3 * i) % 6], 4 + (i % 5)) for i in range(18)]
    handles = []
    barrier = threading.Event()

    def submit_half(part: list[tuple[list[int], object, int]]) -> None:
        barrier.wait()
        for ids, a, n in part:
            handles.append((ids, a, n, engine.submit(ids, adapter=a, max_tokens=n)))  # type: ignore[arg-type]

    threads = [threading.Thread(target=submit_half, args=(jobs[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    barrier.set()
    for t in threads:
        t.join()
    for ids, a, n, handle in handles:
        assert handle.result().token_ids == reference(ids, a, n)  # type: ignore[arg-type]
    stats = engine.stats(sync=True)
    assert stats.slots_pinned == 0 and stats.running == 0 and stats.requests_finished_total == len(jobs)


def test_max_tokens_and_eos(engine: Engine, prompt_ids: list[list[int]]) -> None:
    long = engine.generate(prompt_ids[0], max_tokens=20, ignore_eos=True)
    assert long.finish_reason == "length" and long.completion_tokens == 20
    assert engine.generate(prompt_ids[0], max_tokens=1).completion_tokens == 1
    # pretend the 5th generated token is the end-of-sequence token: generation stops right there
    eos = long.token_ids[4]
    engine._scheduler.eos_ids = {eos}
    stopped = engine.generate(prompt_ids[0], max_tokens=20)
    assert stopped.finish_reason == "stop" and stopped.token_ids == long.token_ids[: long.token_ids.index(eos) + 1]
    ignored = engine.generate(prompt_ids[0], max_tokens=20, ignore_eos=True)
    assert ignored.token_ids == long.token_ids


def test_stop_strings_end_the_text_before_them(
    engine: Engine, adapter: MakeAdapter, prompt_ids: list[list[int]]
) -> None:
    a = adapter(1)
    full = engine.generate(prompt_ids[1], adapter=a, max_tokens=24, ignore_eos=True)
    stop = _printable_window(full.text)
    cut = full.text.find(stop)
    handle = engine.submit(prompt_ids[1], adapter=a, params=SamplingParams(max_tokens=24, stop=("\x00never", stop)))
    deltas = list(handle)
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert "".join(d.text for d in deltas) == result.text
    assert result.token_ids == full.token_ids[: len(result.token_ids)] and len(result.token_ids) < 24
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def _printable_window(text: str) -> str:
    for i in range(1, len(text) - 2):
        window = text[i : i + 2]
        if window.isprintable() and window.strip() == window and "\ufffd" not in window:
            return window
    pytest.skip("the generated text has no printable window to stop on")


def test_streamed_text_adds_up_to_the_result(engine: Engine, adapter: MakeAdapter, tokenizer, prompt_ids) -> None:  # type: ignore[no-untyped-def]
    handle = engine.submit(prompt_ids[3], adapter=adapter(2), params=SamplingParams(max_tokens=16))
    deltas = list(handle)
    result = handle.result()
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert "".join(d.text for d in deltas) == result.text
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.prompt_tokens == len(prompt_ids[3]) and result.time_to_first_token is not None


def test_text_prompt_is_tokenized_like_the_tokenizer(engine: Engine, tokenizer, reference: Reference) -> None:  # type: ignore[no-untyped-def]
    text = "Input: dog Output:"
    assert engine.generate(text, max_tokens=6).token_ids == reference(tokenizer(text)["input_ids"], None, 6)
    chat = engine.chat_prompt([{"role": "user", "content": "hi"}])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == list(expected["input_ids"])


def test_seeded_sampling_is_reproducible(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    a = adapter(1)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate(prompt_ids[0], adapter=a, params=params)
    in_batch = engine.generate_many(
        [prompt_ids[3], prompt_ids[0], prompt_ids[1]],
        [None, a, adapter(2)],
        [SamplingParams(max_tokens=16, temperature=0.7, seed=1), params, SamplingParams(max_tokens=9)],
    )[1]
    assert alone.token_ids == in_batch.token_ids and alone.seed == 1234
    other_seed = engine.generate(prompt_ids[0], adapter=a, params=SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed.token_ids != alone.token_ids
    unseeded = engine.generate(prompt_ids[0], adapter=a, max_tokens=16, temperature=1.0, ignore_eos=True)
    assert unseeded.seed is not None
    replay = engine.generate(
        prompt_ids[0], adapter=a, max_tokens=16, temperature=1.0, ignore_eos=True, seed=unseeded.seed
    )
    assert replay.token_ids == unseeded.token_ids
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    tiny_nucleus = engine.generate(prompt_ids[0], adapter=a, max_tokens=12, temperature=1.0, top_p=1e-6, seed=5)
    assert tiny_nucleus.token_ids == reference(prompt_ids[0], a, 12)
