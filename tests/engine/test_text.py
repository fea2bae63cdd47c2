"""Incremental detokenization and stop strings, token by token."""

from __future__ import annotations

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
