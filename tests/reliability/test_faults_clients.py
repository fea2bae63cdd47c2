"""Clients that leave, and more clients than the engine takes.

* Streams abandoned after their first chunk, and non-streamed requests whose client times out: each request is
  cancelled in the engine, its slot pin and KV rows freed, while a stream running beside them is unaffected.
* Queue full (``max_queue=2``, one row per batch, a burst of long requests): 429 with ``Retry-After`` and the
  ``overloaded`` error type, never a 5xx or a crash; the service serves normally afterwards.
(One abandoned completion stream alone: tests/service/test_openai_api.py.)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx

from tests.reliability.conftest import metric_value, serve

PROMPT = "Input: mango plum kiwi\nOutput:"


def _wait_idle(engine, timeout_s: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    stats = engine.stats(sync=True)
    while (stats.running or stats.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = engine.stats(sync=True)
    return stats


def test_clients_leaving_free_the_engine(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(max_tokens=400)) as service, service.client() as client:
        engine = service.app.state.icm.engine
        for task_id in ("leave-a", "leave-b"):
            assert client.post("/v1/tasks", json={"task_id": task_id, "description": f"Task {task_id}."}).is_success
        survivor_body = {"model": "leave-a", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
        reference = client.post("/v1/completions", json=survivor_body).json()["choices"][0]["text"]
        tokens_before = engine.stats(sync=True).tokens_generated_total

        survivor: list[str] = []

        def survive() -> None:
            with (
                httpx.Client(base_url=service.url, timeout=60) as own,
                own.stream("POST", "/v1/completions", json={**survivor_body, "stream": True}) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        survivor.append(json.loads(line[6:])["choices"][0]["text"])

        def leave_stream(i: int) -> None:
            path, payload = (
                ("/v1/completions", {"prompt": PROMPT})
                if i % 2
                else ("/v1/chat/completions", {"messages": [{"role": "user", "content": "mango plum kiwi"}]})
            )
            body = {"model": ("leave-a", "leave-b")[i % 2], "max_tokens": 400, "temperature": 0.9, "seed": i, **payload}
            with (
                httpx.Client(base_url=service.url, timeout=60) as own,
                own.stream("POST", path, json={**body, "stream": True}) as response,
            ):
                assert response.status_code == 200
                next(line for line in response.iter_lines() if line.startswith("data: "))
            # leaving the block closes the connection with the stream unfinished

        def leave_by_timeout(i: int) -> None:
            body = {"model": "leave-b", "prompt": PROMPT, "max_tokens": 400, "temperature": 0.9, "seed": 100 + i}
            with contextlib.suppress(httpx.TimeoutException):  # the client gives up after 0.3 s
                httpx.post(f"{service.url}/v1/completions", json=body, timeout=0.3)

        threads = [threading.Thread(target=survive)]
        threads += [threading.Thread(target=leave_stream, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=leave_by_timeout, args=(i,)) for i in range(2)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = _wait_idle(engine)
        released_s = time.monotonic() - start
        generated = stats.tokens_generated_total - tokens_before
        print(f"FIGURE disconnect: 8 clients left (6 streams, 2 timeouts), engine idle {released_s:.2f} s after the "
              f"start; {generated} tokens generated of up to {8 * 400 + 40}")  # fmt: skip
        assert stats.running == 0 and stats.queue_depth == 0
        assert stats.slots_pinned == 0 and stats.kv_cache_bytes == 0
        assert "".join(survivor) == reference, "a stream beside the cancelled ones is unaffected"
        assert generated < 2 * 400, "abandoned requests (timeouts included) were cancelled, not run to max_tokens"
        assert client.post("/v1/completions", json=survivor_body).json()["choices"][0]["text"] == reference


def test_queue_full_is_429_with_retry_after(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(max_queue=2, max_batch_size=1, max_tokens=300)
    with serve(settings) as service, service.client() as client:
        engine = service.app.state.icm.engine
        results: list[httpx.Response] = []
        health: list[float] = []

        def long_request(i: int) -> None:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 300, "temperature": 1.0, "seed": i}
            with httpx.Client(base_url=service.url, timeout=120) as own:
                if i % 3 == 0:  # streamed: refused before the stream starts
                    with own.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        response.read()
                        results.append(response)
                else:
                    results.append(own.post("/v1/completions", json=body))

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for _ in range(3):  # the process keeps answering probes meanwhile
            start = time.monotonic()
            assert client.get("/healthz").status_code == 200
            health.append(time.monotonic() - start)
        for thread in threads:
            thread.join(timeout=120)
        statuses = [r.status_code for r in results]
        refused = [r for r in results if r.status_code == 429]
        print(f"FIGURE queue-full: 16 concurrent long requests, max_queue=2, batch 1: {statuses.count(200)} x 200, "
              f"{len(refused)} x 429; /healthz meanwhile max {max(health) * 1000:.0f} ms")  # fmt: skip
        assert len(results) == 16 and set(statuses) <= {200, 429}, statuses
        assert refused, "a burst beyond max_queue is refused"
        for response in refused:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "overloaded"
        stats = _wait_idle(engine)
        assert stats.running == 0 and stats.queue_depth == 0 and stats.slots_pinned == 0
        after = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
        assert after.status_code == 200
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_requests_total", route="/v1/completions", status="429") == len(refused)
        assert metric_value(metrics, "icm_lora_requests_total", route="/v1/completions", status="500") == 0
