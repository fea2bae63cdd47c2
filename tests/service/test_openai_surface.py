"""The OpenAI surface as the official ``openai`` client sees it, over real HTTP, streamed and not: GET /v1/models/{id},
max_completion_tokens, stream_options.include_usage, logprobs / top_logprobs / echo computed for real (checked against
plain transformers), presence / frequency penalties and logit_bias (checked against a reference decoder), n > 1, a
list of prompts, chat content as text parts, the developer role, strict request types, and reserved task ids."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from generator.base_model import load_base_model
from service.config import Settings
from tests.servers import BackgroundServer
from tests.service.conftest import serve

TASK = {
    "task_id": "fruit-or-animal",
    "description": "Decide whether the listed words are fruits or animals.",
    "examples": [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
}
PROMPT = "Input: mango plum kiwi\nOutput:"
EOS = 2  # the tiny model's end-of-sequence token: biased away where a test needs a fixed length
NO_EOS = {str(EOS): -100}


@pytest.fixture(scope="module")
def service(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    settings = Settings(
        base_model="tiny",
        generator_path=small_run / "generator",
        data_dir=tmp_path_factory.mktemp("surface") / "data",
        num_slots=4,
        self_check="keep",  # the tiny generator's adapter may fail its self-check; these tests are about serving it
    )
    with serve(settings) as running, running.client() as client:
        assert client.post("/v1/tasks", json=TASK).status_code == 201
        yield running


@pytest.fixture(scope="module")
def oai(service: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, object]:
    base = load_base_model("tiny")
    base.model.eval()
    return base.model, base.tokenizer


def _prompt_ids(tokenizer: object, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]  # type: ignore[attr-defined]


def _log_softmax(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def _reference_greedy(
    model: torch.nn.Module,
    ids: list[int],
    steps: int,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
) -> list[int]:
    """OpenAI's penalties written out: logit[t] -= frequency * count[t] + presence * (count[t] > 0), plus bias."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().clone()
        for token, count in Counter(out).items():
            logits[token] -= frequency * count + presence
        for token, value in (bias or {}).items():
            logits[token] += value
        out.append(int(logits.argmax()))
    return out


def test_models_retrieve_and_reserved_names(service: BackgroundServer, oai: openai.OpenAI) -> None:
    assert oai.models.retrieve("tiny").id == "tiny"
    card = oai.models.retrieve(TASK["task_id"])
    assert card.id == TASK["task_id"] and card.object == "model" and card.created > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-task")
    with service.client() as client:
        for reserved in ("tiny", "TINY"):
            response = client.post("/v1/tasks", json={**TASK, "task_id": reserved})
            assert response.status_code == 409, response.text
            assert response.json()["error"]["type"] == "reserved_name"
            assert "base model's served name" in response.json()["error"]["message"]
        for bad in ("has space", "-leading-dash", "x" * 129, "slash/inside", "ünï"):
            assert client.post("/v1/tasks", json={**TASK, "task_id": bad}).status_code == 422, bad
        assert client.post("/v1/tasks", json={**TASK, "task_id": "A.b_c-9"}).status_code == 201
        assert client.get("/v1/models/nope%2Fslash").status_code == 404
    listed = [m.id for m in oai.models.list()]
    assert listed.count("tiny") == 1 and TASK["task_id"] in listed


def test_max_completion_tokens_and_usage_chunk(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "mango plum kiwi"}]
    full = oai.chat.completions.create(
        model=TASK["task_id"], messages=messages, max_completion_tokens=3, temperature=0, logit_bias=NO_EOS
    )
    assert full.usage is not None and full.usage.completion_tokens == 3
    assert full.choices[0].finish_reason == "length"
    chunks = list(
        oai.chat.completions.create(
            model=TASK["task_id"],
            messages=messages,
            max_completion_tokens=3,
            temperature=0,
            logit_bias=NO_EOS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    plain = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, stream=True, temperature=0))
    assert all(c.usage is None for c in plain)  # no usage chunk unless asked for
    completion = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=NO_EOS)
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_completion_logprobs_and_echo_match_transformers(oai: openai.OpenAI, reference) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    ids = _prompt_ids(tokenizer, PROMPT)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3, "logit_bias": NO_EOS}
    result = oai.completions.create(**body)
    choice = result.choices[0]
    assert choice.logprobs is not None
    expected_tokens = _reference_greedy(model, ids, 5, bias={EOS: -100})
    assert choice.text == tokenizer.decode(expected_tokens)
    logp = _log_softmax(model, ids + expected_tokens)
    for step, token in enumerate(expected_tokens):
        row = logp[len(ids) - 1 + step]
        assert math.isclose(choice.logprobs.token_logprobs[step], float(row[token]), abs_tol=1e-4)
        top = choice.logprobs.top_logprobs[step]
        assert len(top) == 3
        assert math.isclose(max(top.values()), float(row.max()), abs_tol=1e-4)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected_tokens]
    assert choice.logprobs.text_offset[0] == len(PROMPT)

    echoed = oai.completions.create(**body, echo=True).choices[0]
    assert echoed.text == PROMPT + choice.text
    prompt_part = len(ids) - 1  # the service's BOS is not part of the prompt's text
    assert echoed.logprobs.tokens[:prompt_part] == [tokenizer.decode([t]) for t in ids[1:]]
    assert echoed.logprobs.text_offset[0] == 0
    for position, token in enumerate(ids[1:]):
        assert math.isclose(echoed.logprobs.token_logprobs[position], float(logp[position, token]), abs_tol=1e-4)
    assert echoed.logprobs.token_logprobs[prompt_part:] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-6)

    streamed = list(oai.completions.create(**body, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == echoed.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == echoed.logprobs.tokens
    assert values == pytest.approx(echoed.logprobs.token_logprobs, abs=1e-6)

    # a task's adapter: its own distribution (not the base model's); the greedy token is the most likely one apart
    # from the end-of-sequence token that logit_bias removed (log-probabilities are the model's, before the bias)
    task = oai.completions.create(**{**body, "model": TASK["task_id"]}).choices[0].logprobs
    assert task is not None and task.token_logprobs != pytest.approx(choice.logprobs.token_logprobs, abs=1e-3)
    for value, top in zip(task.token_logprobs, task.top_logprobs, strict=True):
        allowed = [lp for name, lp in top.items() if name != tokenizer.eos_token]
        assert value <= 0 and math.isclose(value, max(allowed), abs_tol=1e-5)


def test_chat_logprobs_streamed_and_not(oai: openai.OpenAI) -> None:
    request = {
        "model": TASK["task_id"],
        "messages": [{"role": "user", "content": "mango plum kiwi"}],
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = oai.chat.completions.create(**request)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 4
    assert "".join(entry.token for entry in content) == full.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        allowed = [t.logprob for t in entry.top_logprobs if t.token != "</s>"]  # end of sequence biased away
        assert math.isclose(entry.logprob, allowed[0], abs_tol=1e-5)  # greedy: the most likely allowed token
        assert bytes(entry.bytes) == entry.token.encode()
    streamed = [
        e
        for c in oai.chat.completions.create(**request, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    without = oai.chat.completions.create(**{k: v for k, v in request.items() if "logprobs" not in k})
    assert without.choices[0].logprobs is None


def test_penalties_and_logit_bias_in_the_sampler(oai: openai.OpenAI, reference) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    ids = _prompt_ids(tokenizer, PROMPT)
    plain = _reference_greedy(model, ids, 8, bias={EOS: -100})
    assert len(set(plain)) < len(plain), "the greedy text must repeat a token for the penalties to matter"
    cases = [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"presence_penalty": 1.0, "frequency_penalty": -0.5},
    ]
    penalised = []
    for penalties in cases:
        expected = _reference_greedy(
            model, ids, 8, penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0), {EOS: -100}
        )
        request = {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": NO_EOS,
            "logprobs": 0,
            **penalties,
        }
        got = oai.completions.create(**request).choices[0]
        assert got.logprobs.tokens == [tokenizer.decode([t]) for t in expected], penalties
        streamed = "".join(c.choices[0].text for c in oai.completions.create(**request, stream=True))
        assert streamed == got.text
        penalised.append(expected)
    assert penalised[0] != plain  # the penalty changed the greedy choice
    assert len(set(penalised[0])) > len(set(plain))

    favourite = 42
    biased = oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=3, logit_bias={str(favourite): 100}
    ).choices[0]
    assert biased.text == tokenizer.decode([favourite] * 6)  # +100 outweighs every other logit, even sampled
    chat = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(favourite): 100},
    )
    assert chat.choices[0].message.content == tokenizer.decode([favourite] * 3)


def test_n_choices_and_prompt_lists(oai: openai.OpenAI) -> None:
    prompts = ["Input: kiwi\nOutput:", "Input: wolf goat\nOutput:"]
    request = {"model": TASK["task_id"], "prompt": prompts, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    first = oai.completions.create(**request)
    assert [c.index for c in first.choices] == list(range(6))
    again = oai.completions.create(**request)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices[:3]}) > 1  # choice j samples with seed + j
    single = oai.completions.create(**{**request, "prompt": prompts[1], "n": 1, "seed": 11})
    assert single.choices[0].text == first.choices[3].text  # prompt 1, choice 0: the same seed
    texts: dict[int, str] = defaultdict(str)
    finished = set()
    for chunk in oai.completions.create(**request, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == set(range(6))
    assert [texts[i] for i in range(6)] == [c.text for c in first.choices]
    assert first.usage.completion_tokens == sum(
        oai.completions.create(**{**request, "prompt": p, "seed": 11}).usage.completion_tokens for p in prompts
    )

    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "n": 2,
        "temperature": 0.8,
        "seed": 5,
    }
    full = oai.chat.completions.create(**chat)
    assert [c.index for c in full.choices] == [0, 1]
    parts: dict[int, str] = defaultdict(str)
    roles: Counter[int] = Counter()
    for chunk in oai.chat.completions.create(**chat, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            roles[c.index] += c.delta.role == "assistant"
    assert [parts[0], parts[1]] == [c.message.content for c in full.choices]
    assert roles == {0: 1, 1: 1}


def test_text_parts_and_developer_role(oai: openai.OpenAI) -> None:
    def answer(messages: list[dict[str, object]], stream: bool = False) -> str:
        if stream:
            chunks = oai.chat.completions.create(
                model=TASK["task_id"],
                messages=messages,
                max_tokens=6,
                temperature=0,
                stream=True,  # type: ignore[arg-type]
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        result = oai.chat.completions.create(model=TASK["task_id"], messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
        return result.choices[0].message.content or ""

    as_strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "mango\nplum"}]
    as_parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "mango"}, {"type": "text", "text": "plum"}]},
    ]
    expected = answer(as_strings)
    assert answer(as_parts) == expected
    assert answer(as_parts, stream=True) == expected
    named = [{**m, "name": "ops_bot"} for m in as_strings]  # OpenAI's participant name: accepted, not templated
    assert answer(named) == expected
    with pytest.raises(openai.UnprocessableEntityError):
        answer([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_strict_types_and_refused_fields(service: BackgroundServer) -> None:
    base = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    bad = [
        ("/v1/completions", {**base, "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {**base, "stream": "yes"}, "stream"),
        ("/v1/completions", {**base, "temperature": "0.5"}, "temperature"),
        ("/v1/completions", {**base, "n": 2.0}, "n"),
        ("/v1/completions", {**base, "suffix": "!"}, "suffix"),
        ("/v1/completions", {**base, "best_of": 2}, "best_of"),
        ("/v1/completions", {**base, "logprobs": True}, "logprobs"),
        ("/v1/completions", {**base, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**base, "n": 9}, "n"),
        ("/v1/completions", {**base, "prompt": []}, "prompt"),
        ("/v1/completions", {**base, "prompt": ["x"] * 17}, "prompt"),
        ("/v1/completions", {**base, "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {**base, "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {**base, "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {**base, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {**base, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {**base, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ("/v1/chat/completions", {**chat, "logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "tools": []}, "tools"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "tool", "content": "x"}]}, "role"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": []}]}, "content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 5}]}, "content"),
        ("/v1/tasks", {**TASK, "task_id": "strict", "seed": "5"}, "seed"),
        ("/v1/tasks", {**TASK, "task_id": "strict", "refine_steps": True}, "refine_steps"),
        ("/v1/adapters", {"description": "d", "examples": [{"input": 1, "output": "x"}]}, "input"),
    ]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for route, body, field in bad:
            response = client.post(route, json=body)
            assert response.status_code == 422, (body, response.text)
            assert field in response.json()["error"]["message"], (body, response.text)
        ok = client.post("/v1/completions", json={**base, "max_tokens": 2, "max_completion_tokens": 2, "n": None})
        assert ok.status_code == 200, ok.text


def test_client_leaving_a_stream_of_several_choices_frees_them_all(service: BackgroundServer) -> None:
    body = {
        "model": "tiny",
        "prompt": [PROMPT, "x"],
        "n": 3,
        "max_tokens": 400,
        "temperature": 0.8,
        "seed": 1,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    with (
        httpx.Client(base_url=service.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        next(r.iter_lines())
    engine = service.server.config.app.state.icm.engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while engine.stats(sync=True).running and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats(sync=True)
    assert stats.running == 0 and stats.queue_depth == 0 and stats.slots_pinned == 0
    assert stats.tokens_generated_total < 6 * 400  # cancelled, not run to max_tokens


def test_a_served_name_with_a_slash_is_retrievable(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(served_model_name="org/tiny-base")) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        assert client.models.retrieve("org/tiny-base").id == "org/tiny-base"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("org/other")
        assert client.completions.create(model="org/tiny-base", prompt="x", max_tokens=1).choices[0].index == 0
