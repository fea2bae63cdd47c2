"""The decode step does not wait on the host: one device-to-host transfer (the sampled tokens) per step.

Counted with patched tensor methods, so it holds on the CPU as on a GPU: every way a tensor's value reaches Python
(``item``, ``tolist``, ``bool``/``int``/``float``/``index``, ``cpu``, ``numpy``) and every ``torch.tensor`` built from
Python values inside ``_decode_step``, including the model's forward pass and the rows leaving the batch.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from service.engine import Engine, SamplingParams
from service.engine.sampling import choose_tokens, sample_row
from tests.engine.conftest import MakeAdapter, Reference

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class SyncCounter:
    """Counts calls made by the thread that set ``active`` (the engine thread, inside a step): the test's own thread
    wakes up as soon as the last token is pushed and may run the reference model while that step still finishes."""

    def __init__(self) -> None:
        self.active_thread: int | None = None
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def active(self) -> bool:
        return self.active_thread == threading.get_ident()

    @active.setter
    def active(self, on: bool) -> None:
        self.active_thread = threading.get_ident() if on else None

    def wrap(self, name: str, original: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            if self.active:
                self.counts[name] += 1
            return original(*args, **kwargs)

        return counted


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncCounter]:
    sync = SyncCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, sync.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", sync.wrap("torch.tensor", torch.tensor))
    yield sync


Step = tuple[collections.Counter[str], tuple[str | None, ...], int]


def _count_steps(engine: Engine, sync: SyncCounter, monkeypatch: pytest.MonkeyPatch) -> list[Step]:
    """Per decode step: what it read back or built from Python values, the batch it ran, the rows it kept."""
    scheduler = engine._scheduler
    step = scheduler._decode_step
    per_step: list[Step] = []

    def counted_step() -> None:
        batch = tuple(job.request_id for job in scheduler._rows)
        sync.counts = collections.Counter()
        sync.active = True
        try:
            step()
        finally:
            sync.active = False
            per_step.append((sync.counts, batch, len(scheduler._rows)))

    monkeypatch.setattr(scheduler, "_decode_step", counted_step)
    return per_step


def test_one_transfer_per_decode_step_in_a_mixed_batch(
    engine: Engine,
    adapter: MakeAdapter,
    reference: Reference,
    prompt_ids: list[list[int]],
    counter: SyncCounter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    per_step = _count_steps(engine, counter, monkeypatch)
    # padded rows of different lengths, two adapters and none, greedy and sampled rows (nucleus and plain), rows
    # leaving at different steps: every path of the step
    params = [
        SamplingParams(max_tokens=10, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=1.0, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1e-300, seed=5, ignore_eos=True),  # overflows: greedy, on device
    ]
    adapters = [adapter(1), None, adapter(2), adapter(1)]
    results = engine.generate_many(prompt_ids, adapters, params)
    engine.stats(sync=True)  # runs between two steps: the last step has finished recording
    assert [len(r.token_ids) for r in results] == [10, 6, 8, 4]
    assert results[0].token_ids == reference(prompt_ids[0], adapters[0], 10)  # still right
    assert results[3].token_ids == reference(prompt_ids[3], adapters[3], 4)  # the overflowing temperature is greedy
    assert len(per_step) == 9  # the prefill gives the first token, then 9 steps for the longest row
    previous: tuple[str | None, ...] = ()
    for counts, batch, kept in per_step:
        reads = {name: n for name, n in counts.items() if name != "torch.tensor"}
        assert reads == {"tolist": 1}, counts  # the sampled tokens, nothing else
        # index tensors are built from Python values only when the batch changes: at most once for the rows that
        # leave (kv cache and per-row tensors share it) and once for the slot index of a new composition
        unchanged = batch == previous and kept == len(batch)
        assert counts["torch.tensor"] <= (0 if unchanged else 2), (counts, len(batch), kept)
        previous = batch
    assert sum(1 for _, batch, kept in per_step if kept == len(batch)) >= 5  # most steps keep their batch


def test_the_counter_sees_a_sync(counter: SyncCounter) -> None:
    """The patched methods do count (so the test above can fail)."""
    counter.active = True
    t = torch.ones(3)
    float(t.sum()), bool(t.all()), t.tolist(), t[0].item()
    counter.active = False
    assert counter.counts == collections.Counter({"__float__": 1, "__bool__": 1, "tolist": 1, "item": 1})


def test_choose_tokens_stays_on_the_device() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    params = [SamplingParams(), SamplingParams(temperature=1e-300, seed=1), SamplingParams(temperature=0.5, seed=2)]
    generators = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tokens = choose_tokens(logits, params, generators)
    assert tokens.dtype == torch.long and tokens.shape == (3,)
    assert tokens[:2].tolist() == [1, 0]
    draw = sample_row(logits[2], 0.5, 1e-6, torch.Generator().manual_seed(0))
    assert draw.shape == () and int(draw) == 2  # a tiny nucleus keeps only the most likely token
    assert not math.isnan(float(draw))
