"""Token ids -> streamed text deltas, with stop strings.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers (a character can span tokens, a
leading space depends on the previous token), so each step decodes a short window and emits what it added (the
prefix/read offsets scheme of text-generation-inference). Text that could be the start of a stop string is held back
until it is known not to be one, so a stop string never reaches the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first generated ones (leading-space rules)


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
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
        self._ids.append(token_id)
        self._pending += self._decode_new()
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
        self._pending += self._decode_rest()
        return self._emit(len(self._pending))

    def _emit(self, upto: int, keep: int | None = None) -> str:
        out = self._pending[:upto]
        self._pending = self._pending[upto:] if keep is None else ""
        self.text += out
        return out

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def _decode_rest(self) -> str:
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
