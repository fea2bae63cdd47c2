"""Long-prompt chunks sized by time while rows decode (``EngineConfig.prefill_chunk_target_ms``, ``ChunkPacer``)."""

from __future__ import annotations

import time

import pytest

from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, SamplingParams
from service.engine.pacing import ChunkPacer
from tests.engine.conftest import MakeAdapter, Reference, StepObserver


def test_pacer_sizes_chunks_from_the_last_chunks_seconds_per_token() -> None:
    pacer = ChunkPacer(0.05, max_tokens=256, min_tokens=8)
    assert pacer.size(decoding=False) == 256  # nobody waits
    assert pacer.size(decoding=True) == 8  # nothing measured yet
    pacer.observe(8, 0.016)  # 2 ms per token
    assert pacer.size(decoding=True) == 16  # 25 would fit the target: at most twice the last chunk
    pacer.observe(20, 0.05)  # 2.5 ms per token
    assert pacer.size(decoding=True) == 20
    pacer.observe(200, 0.001)  # fast: capped at max_tokens
    assert pacer.size(decoding=True) == 256
    pacer.observe(256, 2.56)  # slow: floored at min_tokens
    assert pacer.size(decoding=True) == 8
    off = ChunkPacer(0.0, max_tokens=64)
    off.observe(8, 1.0)
    assert off.size(decoding=True) == 64 and not off.paced


def test_a_chunk_that_seemed_free_does_not_make_the_next_one_huge() -> None:
    pacer = ChunkPacer(0.05, max_tokens=256, min_tokens=8)
    pacer.observe(8, 0.0005)  # a first chunk that seemed to add almost nothing
    sizes = []
    for _ in range(4):
        sizes.append(pacer.size(decoding=True))
        pacer.observe(sizes[-1], 0.00005 * sizes[-1])  # still cheap: the size doubles each time, up to the cap
    assert sizes == [16, 32, 64, 128]


@pytest.mark.parametrize(("fixed_s", "per_token_s"), [(0.02, 0.001), (0.0, 0.002), (0.045, 0.0005)])
def test_pacer_settles_where_a_pass_takes_the_target(fixed_s: float, per_token_s: float) -> None:
    """A pass costs a fixed part (the weights) plus a part per token; the chunk size converges to the target."""
    pacer = ChunkPacer(0.05, max_tokens=4096, min_tokens=8)
    for _ in range(40):
        tokens = pacer.size(decoding=True)
        pacer.observe(tokens, fixed_s + per_token_s * tokens)
    tokens = pacer.size(decoding=True)
    assert fixed_s + per_token_s * tokens == pytest.approx(0.05, rel=0.05)


def _chunks(observer: StepObserver) -> list[int]:
    """Token counts of the one-row prefill passes after the first (the running request's own prefill)."""
    sizes = [tokens for kind, value in observer.events if kind == "prefill" for rows, tokens in [value]]
    return sizes[1:]


@pytest.mark.parametrize(("target_ms", "paced_size"), [(10_000.0, 12), (1e-6, 8)])
def test_chunks_follow_the_target_while_rows_decode(
    target_ms: float,
    paced_size: int,
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observer = StepObserver()
    config = EngineConfig(num_slots=4, prefill_chunk=12, prefill_chunk_target_ms=target_ms)
    engine = Engine(load_base_model("tiny"), config, observer)
    decode = engine._scheduler._decode_step

    def paced_decode() -> None:  # the running stream outlasts the long prompt on any machine
        time.sleep(0.002)
        decode()

    monkeypatch.setattr(engine._scheduler, "_decode_step", paced_decode)
    long_prompt = [t for _ in range(4) for ids in prompt_ids for t in ids]
    try:
        running = engine.submit(prompt_ids[2], params=SamplingParams(max_tokens=400, ignore_eos=True))
        stream = iter(running)
        next(stream)
        result = engine.submit(long_prompt, adapter=adapter(2), params=SamplingParams(max_tokens=5)).result()
        running.cancel()
        list(stream)
    finally:
        engine.close()
    assert result.token_ids == reference(long_prompt, adapter(2), 5)
    chunks = _chunks(observer)
    assert sum(chunks) == len(long_prompt)
    assert chunks[0] == 8  # nothing measured yet: the smallest chunk
    assert all(size == paced_size for size in chunks[1:-1]), chunks  # a fast tiny model: capped; a tiny target: 8


def test_without_decoding_rows_chunks_are_prefill_chunk(prompt_ids: list[list[int]]) -> None:
    observer = StepObserver()
    config = EngineConfig(num_slots=4, prefill_chunk=12, prefill_chunk_target_ms=1e-6)
    engine = Engine(load_base_model("tiny"), config, observer)
    long_prompt = [t for _ in range(4) for ids in prompt_ids for t in ids]
    try:
        engine.generate(prompt_ids[0], max_tokens=1)  # a first prefill, so _chunks can skip one
        engine.generate(long_prompt, max_tokens=2)
    finally:
        engine.close()
    chunks = _chunks(observer)
    assert chunks[:-1] == [12] * (len(chunks) - 1) and sum(chunks) == len(long_prompt)
