"""Cancellation, back-pressure, async streaming, shutdown and the hidden-state reader."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest
import torch

from generator.base_model import load_base_model
from generator.selfcheck import encode_groups
from generator.task_encoder import ModelHiddenStateReader, read_batches
from generator.tasks import Example
from service.engine import Engine, EngineClosed, EngineError, EngineObserver, QueueFull, RequestError, SamplingParams
from service.engine.observer import GuardedObserver
from service.engine.scoring import budget_batches
from tests.engine.conftest import MakeAdapter, Reference

LONG = SamplingParams(max_tokens=400, ignore_eos=True)


def test_cancel_frees_the_slot_pin_and_the_kv_rows(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    a, b = adapter(1), adapter(2)
    with engine.paused():
        doomed = engine.submit(prompt_ids[3], adapter=a, params=LONG)
        other = engine.submit(prompt_ids[0], adapter=b, params=LONG)
    next(iter(doomed))
    before = engine.stats(sync=True)
    assert before.running == 2 and before.slots_pinned == 2 and before.kv_cache_bytes > 0
    doomed.cancel()
    result = doomed.result()
    assert result.finish_reason == "cancelled" and 1 <= result.completion_tokens < 400
    after = engine.stats(sync=True)
    assert after.running == 1 and after.slots_pinned == 1 and after.kv_cache_bytes > 0
    table = engine._scheduler.table
    assert table.pins(table.slot_of(a.adapter_id)) == 0  # type: ignore[arg-type]
    assert table.pins(table.slot_of(b.adapter_id)) == 1  # type: ignore[arg-type]
    other.cancel()
    survived = other.result().token_ids
    expected = reference(prompt_ids[0], b, 40)
    n = min(len(survived), len(expected))
    assert n >= 1 and survived[:n] == expected[:n]  # the remaining row was kept intact when the other left
    final = engine.stats(sync=True)
    assert final.running == 0 and final.slots_pinned == 0 and final.kv_cache_bytes == 0


def test_cancel_while_waiting_and_iteration_stopped_early(engine: Engine, prompt_ids: list[list[int]]) -> None:
    with engine.paused():
        queued = engine.submit(prompt_ids[0], params=LONG)
        queued.cancel()
    assert queued.result().finish_reason == "cancelled" and queued.result().completion_tokens == 0
    handle = engine.submit(prompt_ids[1], params=LONG)
    for _delta in handle:
        break  # the caller went away
    assert handle.result().finish_reason == "cancelled"
    assert engine.stats(sync=True).running == 0


def test_queue_full_is_raised_and_nothing_is_lost(
    make_engine: Callable[..., Engine], prompt_ids: list[list[int]]
) -> None:
    engine = make_engine(num_slots=1, max_batch_size=1, max_queue=2)
    running = engine.submit(prompt_ids[0], params=LONG)
    next(iter(running))  # it holds the only batch row
    waiting = [engine.submit(prompt_ids[1], max_tokens=3), engine.submit(prompt_ids[2], max_tokens=3)]
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(prompt_ids[3], max_tokens=3)
    with pytest.raises(QueueFull):
        engine.submit_many([prompt_ids[3]], None, SamplingParams(max_tokens=3))
    assert engine.stats().queue_depth == 2
    running.cancel()
    assert [h.result().completion_tokens for h in waiting] == [3, 3]
    assert engine.generate(prompt_ids[3], max_tokens=2).completion_tokens == 2  # room again


def test_bad_requests_are_refused(engine: Engine) -> None:
    with pytest.raises(RequestError, match="empty"):
        engine.submit([])
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit([5, 10**6])
    with pytest.raises(RequestError, match="context"):
        engine.submit([5, 6], max_tokens=10_000)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RequestError, match="either"):
        engine.submit([5], params=SamplingParams(), max_tokens=3)
    with pytest.raises(RequestError, match="unknown sampling setting"):
        engine.submit([5], max_new_tokens=3)


def test_async_streaming(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    a = adapter(1)

    async def main() -> tuple[list[int], list[int], str]:
        streamed: list[int] = []
        async for delta in engine.stream(prompt_ids[0], adapter=a, max_tokens=10):
            streamed.extend(delta.token_ids)
        concurrent = await asyncio.gather(
            engine.agenerate(prompt_ids[1], adapter=a, max_tokens=7),
            engine.agenerate(prompt_ids[2], max_tokens=5),
        )
        return streamed, concurrent[0].token_ids, concurrent[1].finish_reason

    streamed, second, reason = asyncio.run(main())
    assert streamed == reference(prompt_ids[0], a, 10)
    assert second == reference(prompt_ids[1], a, 7)
    assert reason in ("length", "stop")


def test_async_consumer_that_goes_away_cancels(engine: Engine, prompt_ids: list[list[int]]) -> None:
    async def main() -> str:
        handle = engine.submit(prompt_ids[0], params=LONG)

        async def consume() -> None:
            async for _delta in handle:
                pass

        task = asyncio.create_task(consume())
        while engine.stats().tokens_generated_total == 0:
            await asyncio.sleep(0.005)
        task.cancel()  # e.g. the HTTP client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        return (await handle.wait()).finish_reason

    assert asyncio.run(main()) == "cancelled"
    assert engine.stats(sync=True).running == 0


def test_close_fails_pending_requests(make_engine: Callable[..., Engine], prompt_ids: list[list[int]]) -> None:
    engine = make_engine(max_batch_size=1)
    running = engine.submit(prompt_ids[0], params=LONG)
    next(iter(running))
    waiting = engine.submit(prompt_ids[1], params=LONG)
    engine.close()
    for handle in (running, waiting):
        with pytest.raises(EngineClosed):
            handle.result()
    with pytest.raises(EngineClosed):
        engine.submit(prompt_ids[0])


def test_hidden_state_reader_equals_the_model_reader(
    engine: Engine, adapter: MakeAdapter, prompt_ids: list[list[int]]
) -> None:
    texts = ["Input: cat Output: dog", "a", "Task: reverse the words of the sentence " * 6]
    fresh = load_base_model("tiny")
    for layer, max_length in ((None, 32), (-1, 16), (0, 96)):
        budget = engine.config.prefill_chunk  # the engine reads in passes of this many tokens
        expected = ModelHiddenStateReader(fresh.model, fresh.tokenizer, layer, max_length, budget=budget)(texts)
        running = engine.submit(prompt_ids[3], adapter=adapter(1), params=LONG)  # adapters are busy meanwhile
        next(iter(running))
        reader = engine.hidden_state_reader(layer, max_length)
        got = reader(texts)
        running.cancel()
        assert got.shape == (3, fresh.hidden_size) and got.dtype == torch.float32
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="outside"):
        engine.hidden_state_reader(layer=99)


def test_long_reads_and_scoring_run_in_budgeted_passes_between_decode_steps(
    make_engine: Callable[..., Engine],
    adapter: MakeAdapter,
    prompt_ids: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hidden-state read and a self-check scoring go through the prefill budget: each pass on the engine thread
    holds at most ``prefill_chunk`` padded tokens (a longer row alone), and running streams decode between passes."""
    budget = 24
    engine = make_engine(num_slots=2, prefill_chunk=budget)
    steps_at_call: list[int] = []
    call = engine._scheduler.call

    def counting(fn: Callable[[], object]) -> object:
        return call(lambda: (steps_at_call.append(engine._scheduler.steps_total), fn())[1])

    monkeypatch.setattr(engine._scheduler, "call", counting)
    decode = engine._scheduler._decode_step

    def paced_decode() -> None:  # 400 tokens of the tiny model would otherwise end before a phase does
        time.sleep(0.005)
        decode()

    monkeypatch.setattr(engine._scheduler, "_decode_step", paced_decode)
    fresh = load_base_model("tiny")
    texts = [f"Input: example number {i} of a read with a few words\nOutput: {i}" for i in range(6)]
    batches = read_batches(fresh.tokenizer, texts, 32, budget)
    assert len(batches) >= 3
    assert all(b.ids.numel() <= budget or b.ids.shape[0] == 1 for b in batches)
    assert sum(b.ids.shape[0] for b in batches) == len(texts)
    groups = encode_groups(fresh.tokenizer, [Example(t, "yes", ("yes", "no")) for t in texts], 32, choices=True)
    scored = [None, engine.prepare_adapter(adapter(2))]
    # a stream per phase, started right before it
    running = engine.submit(prompt_ids[3], adapter=adapter(1), params=LONG)
    stream = iter(running)  # kept: a stream whose reader goes away cancels its request
    next(stream)
    got = engine.hidden_state_reader(None, 32)(texts)
    assert torch.equal(got, ModelHiddenStateReader(fresh.model, fresh.tokenizer, None, 32, budget=budget)(texts))
    assert len(steps_at_call) == len(batches)
    assert all(b > a for a, b in itertools.pairwise(steps_at_call))  # a decode step between passes
    running.cancel()
    assert running.result().finish_reason == "cancelled"  # it ran throughout
    steps_at_call.clear()
    running = engine.submit(prompt_ids[3], adapter=adapter(1), params=LONG)
    stream = iter(running)
    next(stream)
    engine.answer_logprobs(groups, scored)
    assert len(steps_at_call) == len(budget_batches(groups, 2, budget)) >= 3
    assert all(b > a for a, b in itertools.pairwise(steps_at_call))
    running.cancel()
    assert running.result().finish_reason == "cancelled"  # it ran throughout


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    a = adapter(1)
    original = engine.bank.activate
    calls = {"n": 0}

    def flaky(slots: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the second decode step
            raise RuntimeError("injected device failure")
        original(slots)  # type: ignore[arg-type]

    engine.bank.activate = flaky  # type: ignore[method-assign]
    doomed = engine.submit(prompt_ids[0], adapter=a, max_tokens=10)
    with pytest.raises(EngineError, match="injected device failure"):
        doomed.result()
    engine.bank.activate = original  # type: ignore[method-assign]
    assert engine.stats(sync=True).slots_pinned == 0
    assert engine.generate(prompt_ids[0], adapter=a, max_tokens=10).token_ids == reference(prompt_ids[0], a, 10)


def test_an_observer_that_raises_does_not_stop_serving(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()

    class Broken(EngineObserver):
        def on_tokens(self, count: int) -> None:
            raise ValueError("metrics bug")

    engine._scheduler.observer = GuardedObserver(Broken())
    assert engine.generate([5, 6, 7], max_tokens=4).completion_tokens == 4


def test_a_failing_swap_fails_only_the_requests_of_that_adapter(
    engine: Engine, adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    bad, good = adapter(41), adapter(42)
    original = engine.bank.load

    def load(slot: int, prepared: object) -> None:
        if getattr(prepared, "adapter_id", None) == bad.adapter_id:
            raise RuntimeError("copy failed")
        original(slot, prepared)  # type: ignore[arg-type]

    engine.bank.load = load  # type: ignore[method-assign]
    with engine.paused():
        handles = engine.submit_many([prompt_ids[0], prompt_ids[1], prompt_ids[2]], [bad, good, bad], None)
    for i in (0, 2):
        with pytest.raises(EngineError, match="loading the adapter failed: copy failed"):
            handles[i].result()
    assert handles[1].result().token_ids == reference(prompt_ids[1], good, 64)
    engine.bank.load = original  # type: ignore[method-assign]
    stats = engine.stats(sync=True)
    assert stats.slots_pinned == 0 and stats.adapters_resident == 1 and stats.swaps_total == 1
    assert engine.generate(prompt_ids[0], adapter=bad, max_tokens=6).token_ids == reference(prompt_ids[0], bad, 6)
