"""How many tokens of a long prompt to read between two decode steps.

A long prompt is prefilled in chunks, one forward pass between two decode steps, so that running streams keep
decoding; a chunk's pass is what those streams wait for. A fixed chunk size is a poor proxy for that wait: a pass
costs more as the prompt's prefix grows (every chunk attends to all the tokens before it) and differs by machine
(a 256-token chunk of a 2,000-token prompt held 8 SmolLM2 streams 388 ms on one 2-core VM, 664 ms on a slower one).

``ChunkPacer`` sizes chunks by time instead. While rows are decoding, each chunk is sized so that its pass takes
about ``target_s``, from the seconds per token of the chunks before it (their cost grows slowly, so the last one is a
good guide); while nothing decodes, nobody waits, and a chunk is ``max_tokens`` (the engine's ``prefill_chunk``).

A chunk is at most twice the one before it. What a small chunk adds to the decode pass it rides in is close to
nothing and noisy (the pass reads every weight whatever its token count, and the decode pass it is compared with
varies by a few ms), so seconds per token measured on one can be far too low and the next chunk far too large. Seen
on SmolLM2 with 8 streams and a 2,000-token prompt: one step of 253 ms early in the prompt, where the others took
80-100 ms; with the cap (and the decode pass taken as the median of the last 5), no run of six went over 100 ms of
delay to the streams.
"""

from __future__ import annotations


class ChunkPacer:
    """``target_s`` <= 0 turns pacing off: every chunk is ``max_tokens``."""

    def __init__(self, target_s: float, max_tokens: int, min_tokens: int = 8) -> None:
        self.target_s = target_s
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self._seconds_per_token: float | None = None  # of the last chunk read while rows were decoding
        self._last_tokens = 0  # that chunk's size: the next one is at most twice it

    @property
    def paced(self) -> bool:
        return self.target_s > 0

    def size(self, decoding: bool) -> int:
        """Tokens of the next chunk; ``decoding``: rows are decoding and will wait for it."""
        if not self.paced or not decoding:
            return self.max_tokens
        if self._seconds_per_token is None:  # nothing measured yet: start small, grow from the first measurement
            return self.min_tokens
        tokens = min(int(self.target_s / self._seconds_per_token), 2 * self._last_tokens)
        return max(self.min_tokens, min(self.max_tokens, tokens))

    def observe(self, tokens: int, seconds: float) -> None:
        """A chunk of ``tokens`` took ``seconds`` (a pass with rows decoding beside it)."""
        if tokens > 0 and seconds > 0:
            self._seconds_per_token = seconds / tokens
            self._last_tokens = tokens
