"""vLLM with the icm-lora plugin serves icm-lora tasks by id, with the same greedy tokens as icm-lora itself."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.vllm.conftest import Servers

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TASKS = {
    "fruit-or-animal": (
        "Decide whether the listed words are fruits or animals.",
        [("kiwi pear lime", "fruit"), ("wolf goat otter", "animal"), ("plum fig", "fruit"), ("cat owl", "animal")],
        ["mango plum kiwi", "horse dog", "apple banana", "lion tiger bear"],
    ),
    "sentiment": (
        "Classify the sentiment of a hotel review as positive or negative.",
        [("Spotless room, friendly staff.", "positive"), ("Dirty towels and rude staff.", "negative")],
        ["The bed was comfortable.", "Noisy and cold.", "We loved the breakfast.", "Never again."],
    ),
    "capital": (
        "Name the capital city of the country.",
        [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")],
        ["Germany", "Spain", "Egypt", "Canada"],
    ),
    "antonym": (
        "Give the opposite of the word.",
        [("hot", "cold"), ("up", "down"), ("big", "small")],
        ["fast", "light", "open", "happy"],
    ),
    "plural": (
        "Write the plural of the English noun.",
        [("cat", "cats"), ("box", "boxes"), ("child", "children")],
        ["mouse", "dog", "city", "knife"],
    ),
}


def _complete(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, int]:
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    usage = answer.usage.completion_tokens if answer.usage else -1
    return answer.choices[0].text, usage


def test_vllm_serves_icm_lora_tasks(servers: Servers) -> None:
    icm = openai.OpenAI(base_url=f"{servers.icm.url}/v1", api_key="unused", max_retries=0)
    vllm = openai.OpenAI(base_url=f"{servers.vllm_url}/v1", api_key="unused", max_retries=0, timeout=120)
    adapters = {}
    with httpx.Client(base_url=servers.icm.url, timeout=120) as http:
        for task_id, (description, examples, _) in TASKS.items():
            body = {"task_id": task_id, "description": description,
                    "examples": [{"input": i, "output": o} for i, o in examples]}  # fmt: skip
            created = http.post("/v1/tasks", json=body)
            assert created.status_code == 201, created.text
            adapters[task_id] = created.json()["adapter_id"]

        mismatches, first_request_s, repeat_s = [], [], []
        for task_id, (_, _, prompts) in TASKS.items():
            for n, text in enumerate(prompts):
                prompt = f"Input: {text}\nOutput:"
                start = time.perf_counter()
                theirs = _complete(vllm, task_id, prompt)
                (first_request_s if n == 0 else repeat_s).append(time.perf_counter() - start)
                ours = _complete(icm, task_id, prompt)
                if theirs != ours:
                    mismatches.append((task_id, text, ours, theirs))
        cases = sum(len(p) for *_, p in TASKS.values())
        print(f"FIGURE vllm-vs-icm-lora: {cases - len(mismatches)} of {cases} greedy completions equal")
        print(f"FIGURE vllm first request of a new task: {[round(s, 2) for s in first_request_s]} s; "
              f"later requests p50 {sorted(repeat_s)[len(repeat_s) // 2]:.2f} s")  # fmt: skip
        print(f"FIGURE start-up: icm-lora {servers.icm_start_s:.0f} s, vLLM {servers.vllm_start_s:.0f} s")
        assert mismatches == []

        # an adapter id works as a model name too
        some_id = adapters["capital"]
        assert _complete(vllm, some_id, "Input: Spain\nOutput:") == _complete(icm, "capital", "Input: Spain\nOutput:")

        # an unknown name is vLLM's 404
        with pytest.raises(openai.NotFoundError):
            vllm.completions.create(model="no-such-task", prompt="Input: x\nOutput:", max_tokens=2)

        # a deleted task stops being served (the plugin's watcher unloads it)
        assert http.delete("/v1/tasks/antonym").status_code == 200
        deadline = time.monotonic() + 30
        while True:
            try:
                _complete(vllm, "antonym", "Input: fast\nOutput:")
            except openai.NotFoundError:
                break
            assert time.monotonic() < deadline, "vLLM kept serving a deleted task"
            time.sleep(0.5)
        assert _complete(vllm, "plural", "Input: dog\nOutput:")[0] == _complete(icm, "plural", "Input: dog\nOutput:")[0]
