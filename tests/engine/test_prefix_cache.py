"""The chat template's opening is prefilled once per adapter: later chat prompts read only what follows it, and give
the same greedy tokens as plain peft reading the whole prompt."""

from __future__ import annotations

from collections.abc import Callable

from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, SamplingParams
from service.engine.engine import chat_token_ids
from service.engine.prefix_cache import PrefixCache, chat_opening
from tests.engine.conftest import MakeAdapter, RecordingObserver, Reference

QUESTIONS = ("red green blue", "Which is the largest of these numbers: 3, 9 or 4?", "hi")


class PrefillObserver(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.prefills: list[tuple[int, int]] = []  # (rows, tokens read)

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self.prefills.append((rows, tokens))


def _chats(engine: Engine) -> list[list[int]]:
    return [chat_token_ids(engine.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def test_the_opening_is_what_every_one_message_chat_starts_with(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    opening = chat_opening(engine.tokenizer, chat_token_ids)
    assert len(opening) >= 2
    assert all(tuple(ids[: len(opening)]) == opening and len(ids) > len(opening) for ids in _chats(engine))
    assert engine.tokenizer.decode(list(opening)).startswith("<|user|>")


def test_cached_openings_give_peft_tokens_and_are_not_read_again(adapter: MakeAdapter, reference: Reference) -> None:
    observer = PrefillObserver()
    with Engine(load_base_model("tiny"), EngineConfig(num_slots=4), observer) as engine:
        chats = _chats(engine)
        opening = len(chat_opening(engine.tokenizer, chat_token_ids))
        adapters = [None, adapter(1), adapter(2)]
        rows = [(ids, a) for a in adapters for ids in chats]
        params = SamplingParams(max_tokens=8)
        first = engine.generate_many([r[0] for r in rows], [r[1] for r in rows], params)
        stats = engine.stats(sync=True)
        assert (stats.prefix_hits_total, stats.prefix_misses_total) == (0, len(rows))
        again = engine.generate_many([r[0] for r in rows], [r[1] for r in rows], params)
        stats = engine.stats(sync=True)
        assert stats.prefix_hits_total == len(rows)
        alone = engine.generate(chats[1], adapter(2), max_tokens=8)  # one row, after its adapter's opening
        assert engine.stats(sync=True).prefix_hits_total == len(rows) + 1
    for (ids, a), one, two in zip(rows, first, again, strict=True):
        assert one.token_ids == two.token_ids == reference(ids, a, 8)
    assert alone.token_ids == reference(chats[1], adapter(2), 8)
    read = [tokens for _, tokens in observer.prefills]
    assert read[-1] == len(chats[1]) - opening  # the second pass read only what follows the opening
    assert read[:2] == [read[0], read[0] - len(rows) * opening]  # (padded) tokens of the two mixed passes


def test_a_row_without_a_cached_opening_makes_the_whole_prefill_read_everything(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    engine = make_engine(num_slots=4)
    chats = _chats(engine)
    engine.generate(chats[0], None, max_tokens=2)  # the base model's opening is cached
    prompts = [chats[1], prompt_ids[3], chats[2]]  # a plain completion prompt, and an adapter never seen
    adapters = [None, None, adapter(3)]
    hits = engine.stats(sync=True).prefix_hits_total
    results = engine.generate_many(prompts, adapters, SamplingParams(max_tokens=6))
    for ids, a, result in zip(prompts, adapters, results, strict=True):
        assert result.token_ids == reference(ids, a, 6)
    stats = engine.stats(sync=True)
    assert stats.prefix_hits_total == hits  # the batch was read in full
    assert stats.prefix_misses_total >= 3


def test_off_and_bounded(make_engine: Callable[..., Engine], adapter: MakeAdapter) -> None:
    off = make_engine(prefix_cache_entries=0)
    chats = _chats(off)
    for _ in range(2):
        off.generate(chats[0], None, max_tokens=2)
    assert off.stats(sync=True).prefix_hits_total == 0
    assert PrefixCache((1, 2), entries=0).opening == ()

    bounded = make_engine(num_slots=4, prefix_cache_entries=2)
    for a in (None, adapter(1), adapter(2)):  # the base model's entry is the least recently used: dropped
        bounded.generate(chats[0], a, max_tokens=2)
    bounded.generate(chats[1], None, max_tokens=2)
    stats = bounded.stats(sync=True)
    assert (stats.prefix_hits_total, stats.prefix_misses_total) == (0, 4)
    bounded.generate(chats[1], adapter(2), max_tokens=2)
    assert bounded.stats(sync=True).prefix_hits_total == 1


def test_rows_that_leave_early_do_not_cut_the_others_openings(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, reference: Reference
) -> None:
    """After a prefill from cached openings, rows of different lengths leave at different steps; the cache drops the
    columns every remaining row pads, which must never be an opening's."""
    engine = make_engine(num_slots=4)
    chats = _chats(engine)
    adapters = [None, adapter(1), None]
    for ids, a in zip(chats, adapters, strict=True):
        engine.generate(ids, a, max_tokens=1)  # every opening cached
    hits = engine.stats(sync=True).prefix_hits_total
    lengths = (2, 9, 5)  # the longest prompt leaves first, so the others' padding columns become droppable
    order = sorted(range(3), key=lambda i: -len(chats[i]))
    with engine.paused():  # admitted together: one prefill, the rows padded to the longest
        handles = [
            engine.submit(chats[i], adapters[i], SamplingParams(max_tokens=lengths[k])) for k, i in enumerate(order)
        ]
    results = [h.result() for h in handles]
    assert engine.stats(sync=True).prefix_hits_total == hits + 3
    for k, i in enumerate(order):
        assert results[k].token_ids == reference(chats[i], adapters[i], lengths[k])
