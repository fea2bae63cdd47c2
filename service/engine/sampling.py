"""Per-request sampling parameters and the choice of each row's next token from a batch of logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy decoding (argmax, as ``generate(do_sample=False)``).

    ``stop``: strings that end the generation; the returned text stops before the first of them.
    ``seed``: makes sampled decoding reproducible; without one the engine draws a seed (reported in the result).
    ``ignore_eos``: keep going past the end-of-sequence token (benchmarks, fixed-length outputs).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """logits [B, V] (fp32 or lower) -> [B] token ids (long, on the logits' device). Greedy rows take the argmax;
    sampled rows draw from their own generator, so a request's draws do not depend on the other rows of the batch.

    Nothing here waits for the device: the caller copies the tokens to the host once per step."""
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = sample_row(logits[i], p.temperature, p.top_p, generators[i])
    return tokens


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw (a 0-d long tensor on the logits' device) from softmax(logits / temperature), restricted to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling; the most likely token is always
    kept)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # a temperature so small that logits / temperature overflows (1e-300 is valid input): its limit is greedy. Decided
    # on the device (no host sync): non-finite probabilities become the argmax's one-hot distribution.
    greedy = torch.zeros_like(probs).scatter_(0, logits.argmax().view(1), 1.0)
    probs = torch.where(torch.isfinite(probs).all(), probs, greedy)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[0] = False  # a top_p that rounds to 0 in fp32 (5e-324) must not mask every token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[choice].view(())
    return torch.multinomial(probs, 1, generator=generator).view(())
