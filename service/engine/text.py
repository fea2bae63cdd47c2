"""Token ids -> streamed text deltas, with stop strings.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers (a character can span tokens, a
leading space depends on the previous token), so the text of a new token is the difference between the decoding of a
short window with and without it (the prefix/read offsets scheme of text-generation-inference). With a fast tokenizer
that is ``tokenizers``' own ``DecodeStream`` (one decode per token, in Rust); other tokenizers get the same scheme in
Python (two decodes per token). Text that could be the start of a stop string is held back until it is known not to
be one, so a stop string never reaches the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first generated ones (leading-space rules)


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._decoder: _StreamDecoder | _WindowDecoder = (
            _StreamDecoder(backend, context) if isinstance(backend, Tokenizer) else _WindowDecoder(tokenizer, context)
        )
        self._stop = tuple(stop)
        self._pending = ""  # decoded, not yet emitted (may be the start of a stop string)
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text that can be emitted now ("" when held back).

        After a stop string is seen, ``stopped`` is True and the text up to (not including) it has been emitted.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.step(token_id)
        if self._stop:
            cut = _first_stop(self._pending, self._stop)
            if cut is not None:
                self.stopped = True
                return self._emit(cut, keep=0)
            return self._emit(len(self._pending) - _held_back(self._pending, self._stop))
        return self._emit(len(self._pending))

    def flush(self) -> str:
        """At the end of generation: emit whatever was held back."""
        if self.stopped:
            return ""
        self._pending += self._decoder.rest()
        return self._emit(len(self._pending))

    def _emit(self, upto: int, keep: int | None = None) -> str:
        out = self._pending[:upto]
        self._pending = self._pending[upto:] if keep is None else ""
        self.text += out
        return out


class _StreamDecoder:
    """A fast tokenizer's ``DecodeStream``, primed with the prompt's last tokens. It answers None while a token does
    not complete a character; those tokens are kept so that ``rest`` can decode them at the end (as U+FFFD, like a
    full decode)."""

    def __init__(self, backend: Tokenizer, context: list[int]) -> None:
        self._backend = backend
        self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        self._context = context  # the last tokens that were turned into text
        self._held: list[int] = []  # tokens not turned into text yet

    def step(self, token_id: int) -> str:
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as exc:  # tokenizers raises a plain Exception; only its invalid-prefix case is expected
            if "Invalid prefix" not in str(exc):
                raise
            # the window's decoded prefix changed under the new token: decode it here and start a new stream
            window = [*self._context, *self._held, token_id]
            prefix = self._backend.decode(self._context, skip_special_tokens=True)
            full = self._backend.decode(window, skip_special_tokens=True)
            self._context, self._held = window[-_CONTEXT_TOKENS:], []
            self._stream = DecodeStream(ids=self._context, skip_special_tokens=True)
            return full[len(prefix) :] if full.startswith(prefix) else full
        if text is None:
            self._held.append(token_id)
            return ""
        if self._held:
            self._context, self._held = [*self._context, *self._held, token_id][-_CONTEXT_TOKENS:], []
        else:
            self._context = [*self._context[1 - _CONTEXT_TOKENS :], token_id]
        return text

    def rest(self) -> str:
        if not self._held:
            return ""
        prefix = self._backend.decode(self._context, skip_special_tokens=True)
        full = self._backend.decode([*self._context, *self._held], skip_special_tokens=True)
        self._context, self._held = [*self._context, *self._held][-_CONTEXT_TOKENS:], []
        return full[len(prefix) :] if full.startswith(prefix) else ""


class _WindowDecoder:
    """The same scheme for tokenizers without a Rust backend: two decodes of a short window per token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def rest(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
