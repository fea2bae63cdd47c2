"""Decode groups: a long prompt that joins short running streams decodes in a group of its own (no rebuilt cache, no
padding for the short rows), groups merge once that is cheaper, and every token still equals peft's."""

from __future__ import annotations

import pytest

from service.engine import Engine, EngineConfig, SamplingParams
from service.engine.scheduler import Scheduler, _padding_added
from tests.engine.conftest import MakeAdapter, RecordingObserver, Reference


class GroupObserver(RecordingObserver):
    """On the engine thread, at each decode pass: how many groups ran and the rows of this one."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler: Scheduler | None = None
        self.passes: list[tuple[int, int]] = []

    def on_batch(self, size: int) -> None:
        super().on_batch(size)
        assert self.scheduler is not None
        self.passes.append((len(self.scheduler._groups), size))


def _same_until_eos(engine_tokens: list[int], peft_tokens: list[int]) -> bool:
    """The engine ignored EOS (the rows must keep running); peft's ``generate`` stops at it."""
    return len(peft_tokens) > 0 and engine_tokens[: len(peft_tokens)] == peft_tokens


def test_padding_added_counts_the_shorter_side() -> None:
    assert _padding_added(group_rows=4, group_length=10, rows=1, length=300) == 4 * 290
    assert _padding_added(group_rows=1, group_length=300, rows=2, length=10) == 2 * 290
    assert _padding_added(group_rows=3, group_length=10, rows=1, length=10) == 0


@pytest.mark.parametrize("fused", [False, True])
def test_a_long_prompt_decodes_in_its_own_group_then_the_groups_merge(
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    fused: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fused``: the groups' steps (and the long prompt's chunks) go in one forward pass per step (``fused.py``)."""
    from generator.base_model import load_base_model

    fused_groups: list[int] = []  # groups in each fused pass without a chunk
    original = Scheduler._fused_step

    def counted(self: Scheduler) -> None:
        if not self._prefilling:
            fused_groups.append(len(self._groups))
        original(self)

    monkeypatch.setattr(Scheduler, "_fused_step", counted)
    observer = GroupObserver()
    config = EngineConfig(num_slots=4, max_batch_size=8, prefill_chunk=64, fused_passes=fused)
    engine = Engine(load_base_model("tiny"), config, observer)
    observer.scheduler = engine._scheduler
    threshold = engine._scheduler.group_cost_positions
    long_prompt = ([t for ids in prompt_ids for t in ids] * 20)[:300]
    short = [prompt_ids[0], prompt_ids[1], prompt_ids[3], prompt_ids[0]]
    assert len(short) * (len(long_prompt) - max(map(len, short))) > threshold  # too much padding to share a pass
    lengths = [12, 30, 60, 60]  # the short rows leave one by one, so the padding of a merge shrinks below the cost
    try:
        streams = [
            engine.submit(ids, adapter=adapter(i % 2 + 1), params=SamplingParams(max_tokens=n, ignore_eos=True))
            for i, (ids, n) in enumerate(zip(short, lengths, strict=True))
        ]
        first = iter(streams[-1])
        next(first)  # the short rows run
        late = engine.submit(long_prompt, adapter=adapter(3), params=SamplingParams(max_tokens=50, ignore_eos=True))
        results = [s.result() for s in streams]
        long_result = late.result()
        stats = engine.stats()
    finally:
        engine.close()
    for ids, n, i, result in zip(short, lengths, range(4), results, strict=True):
        assert _same_until_eos(result.token_ids, reference(ids, adapter(i % 2 + 1), n))
    assert _same_until_eos(long_result.token_ids, reference(long_prompt, adapter(3), 50))
    two = [size for groups, size in observer.passes if groups == 2]
    assert 1 in two  # the long row decoded alone beside the short ones
    first_two = next(i for i, (groups, _) in enumerate(observer.passes) if groups == 2)
    merged = [i for i, (groups, size) in enumerate(observer.passes) if i > first_two and groups == 1 and size >= 2]
    assert merged  # later, one pass held the long row and the remaining short ones
    assert stats.decode_groups == 0 and stats.running == 0
    assert (fused_groups.count(2) > 0) == fused  # two groups, one pass
    assert (stats.fused_chunks_total > 0) == fused  # the 300-token prompt's chunks rode in the short rows' passes
