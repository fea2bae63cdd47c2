"""Incremental detokenization and stop strings, token by token."""

from __future__ import annotations

import pytest

from generator.base_model import load_base_model
from service.engine.text import TextStream


def _feed(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(t) for t in ids]


def test_deltas_add_up_to_the_decoded_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Task: reverse the words. Input: red green blue Output: blue green red"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, prompt_ids=[], stop=())
    deltas = _feed(stream, ids)
    assert "".join(deltas) + stream.flush() == text == stream.text
    assert sum(1 for d in deltas if d) > 5  # streamed piece by piece, not all at the end


def test_multibyte_characters_are_held_until_complete(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "été → 東京"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, prompt_ids=[], stop=())
    deltas = _feed(stream, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == text


def test_stop_string_is_cut_and_never_streamed(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("Input: cat Output: dog Input: cow")["input_ids"]
    stream = TextStream(tokenizer, prompt_ids=[], stop=("Output:", "zzz"))
    deltas = _feed(stream, ids)
    assert stream.stopped and stream.text == "Input: cat "
    assert "".join(deltas) == "Input: cat "
    assert all("Out" not in d for d in deltas)
    assert stream.flush() == "" and stream.push(ids[0]) == ""


def test_partial_stop_is_released_when_it_does_not_complete(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Input: cat Out of here"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, prompt_ids=[], stop=("Output:",))
    deltas = _feed(stream, ids)
    assert not stream.stopped
    assert "".join(deltas) + stream.flush() == text


def test_prompt_context_keeps_the_leading_space(tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = tokenizer("Input: cat")["input_ids"]
    generated = tokenizer("Input: cat Output: dog")["input_ids"][len(prompt) :]
    stream = TextStream(tokenizer, prompt_ids=prompt, stop=())
    out = "".join(_feed(stream, generated)) + stream.flush()
    assert out == tokenizer.decode(generated)


SAMPLES = (
    "Héllo wörld: été → 東京, 日本語のテキスト 😀👍🏽 and ünïcödé",
    "two  spaces,   three, a tab\there\nand\n\nnew lines  ",
    " leading space and trailing ",
    "code: def f(x):\n    return x ** 2  # ok",
)


def _check_stream_matches_full_decode(tokenizer, text: str, prompt: str) -> None:  # type: ignore[no-untyped-def]
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + text)["input_ids"][len(prompt_ids) :]
    stream = TextStream(tokenizer, prompt_ids=prompt_ids, stop=())
    deltas = _feed(stream, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    for n in range(1, len(ids) + 1):  # after every token: what was emitted is a prefix of the full decode
        assert tokenizer.decode(ids[:n], skip_special_tokens=True).startswith("".join(deltas[:n]))


def test_deltas_match_full_decode_for_multibyte_and_spaces(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for text in SAMPLES:
        for prompt in ("", "Input: x Output:", "Answer:\n"):
            _check_stream_matches_full_decode(tokenizer, text, prompt)


@pytest.mark.slow
def test_deltas_match_full_decode_with_smollm2_tokenizer() -> None:
    tokenizer = load_base_model("smollm2-135m").tokenizer
    assert tokenizer.is_fast  # the DecodeStream path
    for text in SAMPLES:
        for prompt in ("", "<|im_start|>assistant\n", "Input: x Output:"):
            _check_stream_matches_full_decode(tokenizer, text, prompt)


def test_stop_string_split_across_multibyte_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("réponse: 東京 → fin. 東京 again")["input_ids"]
    stream = TextStream(tokenizer, prompt_ids=[], stop=("→ fin",))
    deltas = _feed(stream, ids)
    assert stream.stopped and "".join(deltas) == stream.text == "réponse: 東京 "


def test_an_incomplete_character_at_the_end_is_flushed_as_in_a_full_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("ok 😀")["input_ids"]
    cut = ids[:-1]  # the emoji's bytes, incomplete
    stream = TextStream(tokenizer, prompt_ids=[], stop=())
    out = "".join(_feed(stream, cut)) + stream.flush()
    assert out == tokenizer.decode(cut, skip_special_tokens=True)
