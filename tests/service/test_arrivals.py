"""Completion requests tell the engine they are coming (``service.api.arrivals``): an arrival opens when the request
reaches the service and closes when it is submitted, or when it fails before that; other routes open none."""

from __future__ import annotations

import json

from service.engine import Arrival, Engine
from tests.service.conftest import serve

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}


class CountingArrivals:
    """Wraps ``Engine.arrival``: how many opened."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inner = engine.arrival
        self.opened = 0

    def __call__(self) -> Arrival:
        self.opened += 1
        return self.inner()


def test_an_arrival_lasts_until_submit_and_never_outlives_its_request(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        engine: Engine = service.app.state.icm.engine
        counting = CountingArrivals(engine)
        engine.arrival = counting  # type: ignore[method-assign]
        model = client.get("/v1/models").json()["data"][0]["id"]
        assert counting.opened == 0  # not a completion

        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "model": model, "stream": True}) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert counting.opened == 1
            assert engine.stats().arriving == 0  # closed at submit, while the stream is still open
            assert [line for line in lines if line][-1] == "data: [DONE]"

        completion = client.post("/v1/completions", json={"model": model, "prompt": "a b c", "max_tokens": 3})
        assert completion.status_code == 200, completion.text
        bad = client.post("/v1/chat/completions", json={**CHAT, "model": model, "max_tokens": -1})
        assert bad.status_code == 422
        unknown = client.post("/v1/chat/completions", json={**CHAT, "model": "no-such-task"})
        assert unknown.status_code == 404
        assert counting.opened == 4
        assert engine.stats().arriving == 0
