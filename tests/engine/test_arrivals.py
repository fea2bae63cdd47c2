"""``Engine.arrival``: an idle engine holds a waiting request's prefill while another request is on its way, so both
share one pass; a request with no other arrival open is not held, and the hold ends at ``arrival_wait_ms``."""

from __future__ import annotations

import threading
import time

from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, EngineObserver, SamplingParams

PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


class Prefills(EngineObserver):
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.lock = threading.Lock()

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        with self.lock:
            self.rows.append(rows)


def engine(wait_ms: float, observer: EngineObserver) -> Engine:
    return Engine(load_base_model("tiny"), EngineConfig(num_slots=1, arrival_wait_ms=wait_ms), observer)


def test_a_request_waits_for_one_on_its_way_and_both_share_one_prefill() -> None:
    prefills = Prefills()
    with engine(60_000, prefills) as e:
        e.generate("warm up", None, PARAMS)
        prefills.rows.clear()
        arrival = e.arrival()
        first = e.submit("the first request", None, PARAMS)
        time.sleep(0.3)
        assert not first.done and prefills.rows == []  # held: another request is on its way
        second = e.submit("the second one", None, PARAMS)
        arrival.close()
        assert len(first.result(timeout=30).token_ids) == len(second.result(timeout=30).token_ids) == 3
    assert prefills.rows == [2]


def test_a_lone_request_is_not_held_and_a_hold_ends_at_the_wait() -> None:
    prefills = Prefills()
    with engine(60_000, prefills) as e:
        start = time.monotonic()
        e.generate("nobody else is coming", None, PARAMS)
        assert time.monotonic() - start < 30  # not held for the 60 s wait
        arrival = e.arrival()
        arrival.close()
        arrival.close()  # closing twice is harmless: the count stays at zero
        assert e.stats().arriving == 0
        start = time.monotonic()
        e.generate("still alone", None, PARAMS)
        assert time.monotonic() - start < 30
    with engine(200, Prefills()) as e:
        e.arrival()  # never closed (a request that never comes)
        start = time.monotonic()
        assert len(e.generate("held at most 200 ms", None, PARAMS).token_ids) == 3
        assert time.monotonic() - start >= 0.2
