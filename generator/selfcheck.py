"""The self-check of a generated adapter: does it answer the task's own examples better than the base model?

Both models score the expected output of each example given its prompt (``format_prompt``), as the mean
log-likelihood per answer token (the end-of-sequence token is left out, so an adapter is not credited for knowing
where to stop). For multiple-choice examples the check is decided first by **accuracy on the examples** (the choice
with the highest mean log-likelihood, as the quality report ranks them): an adapter that answers fewer examples right
than the base model fails, one that answers more passes, and a tie is decided by the expected output's likelihood
normalised over the example's choices (so that learning the answer format alone does not pass). Likelihood alone
decides examples without choices. Accuracy first, because a likelihood gain can come from a few examples the base
model gets very wrong while the adapter loses others (BIG-bench ``swahili_english_proverbs``: +0.27 nats with 3 of 8
right for the base model and 1 of 8 for the adapter, and 12.5 points below base on the test set).

Examples the task vector did not read are used when there are at least ``MIN_HELD_OUT`` of them (``held_out: true``);
otherwise all examples are scored in-sample and the result says so. (Scoring each example with an adapter generated
without it, cross-fitted from the same hidden states, made the same decision on all 16 held-out tasks of the report,
within 0.05 nats on 15: the generated adapter moves little with any one example, so cross-fitting is not done.)
The check is a guard, not a benchmark: its job is to catch an adapter that makes the task's answers worse than no
adapter does, from a handful of examples.

Each example is one ``AnswerGroup`` (its prompt and its choices, or its expected output), packed as one segment of a
row so the prompt is read once for all its choices (short examples share a row, ``generator.batching.layout_rows``),
and a scorer may score the base model and the adapter in the same forward pass (the engine does: its rows carry
their own adapter slots).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from generator.adapter import GeneratedAdapter
from generator.batching import AnswerGroup, encode_group, pack_groups, packed_answer_logprobs
from generator.lora_model import LoraModel
from generator.tasks import Example, TaskSpec, format_prompt, format_target

MIN_HELD_OUT = 2
DEFAULT_MARGIN = 0.0

SelfCheckPolicy = Literal["fallback", "refine", "keep"]
"""What a service does with an adapter that fails its self-check: serve the base model and say so (``fallback``),
refine the adapter on the examples (``refine``; the base model is served until the refined adapter passes), or serve
it anyway with a warning (``keep``)."""

AnswerScorer = Callable[[Sequence[AnswerGroup], Sequence[GeneratedAdapter | None]], torch.Tensor]
"""(groups, adapters with None for the base model) -> [len(adapters), answers] mean log-probability per answer token,
answers numbered across the groups in order (fp32, CPU)."""


@dataclass(frozen=True)
class SelfCheck:
    """``base`` / ``adapter``: mean log-likelihood per answer token (normalised over the choices for multiple-choice
    examples); ``base_correct`` / ``adapter_correct``: examples whose top choice is the expected output (None when the
    examples have no choices)."""

    base: float
    adapter: float
    examples: int
    held_out: bool
    margin: float = DEFAULT_MARGIN
    base_correct: int | None = None
    adapter_correct: int | None = None

    @property
    def delta(self) -> float:
        return self.adapter - self.base

    @property
    def passed(self) -> bool:
        """Fewer examples right than the base model fails, more passes; a tie (or no choices) is decided by the
        likelihood, within ``margin``."""
        right, base_right = self.adapter_correct, self.base_correct
        if right is not None and base_right is not None and right != base_right:
            return right > base_right
        return self.delta >= -self.margin

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "base_loglik": round(self.base, 6),
            "adapter_loglik": round(self.adapter, 6),
            "delta": round(self.delta, 6),
            "base_correct": self.base_correct,
            "adapter_correct": self.adapter_correct,
            "examples": self.examples,
            "held_out": self.held_out,
            "passed": self.passed,
        }


def describe(check: Mapping[str, object]) -> str:
    """A stored check (``SelfCheck.to_dict``) in words: the examples each model answers right (with choices), then
    the likelihood difference."""
    parts = []
    base, tuned, examples = check.get("base_correct"), check.get("adapter_correct"), check.get("examples")
    if isinstance(base, int) and isinstance(tuned, int):
        parts.append(f"{tuned} of {examples} examples right vs {base} without the adapter")
    delta = check.get("delta")
    if isinstance(delta, int | float):
        parts.append(f"answer log-likelihood {float(delta):+.3f} nats/token vs the base model")
    return "; ".join(parts)


def check_examples(spec: TaskSpec, read: int) -> tuple[tuple[Example, ...], bool]:
    """The examples to score and whether they are held out from the task vector (which reads the first ``read``)."""
    rest = spec.examples[read:]
    if len(rest) >= MIN_HELD_OUT:
        return rest, True
    return spec.examples, False


def encode_groups(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int, choices: bool
) -> list[AnswerGroup]:
    """One group per example: its choices when ``choices``, else its expected output."""
    return [
        encode_group(
            tokenizer,
            format_prompt(e.input),
            [format_target(c) for c in (e.choices or ())] if choices else [format_target(e.output)],
            max_length,
        )
        for e in examples
    ]


def self_check(
    spec: TaskSpec,
    adapter: GeneratedAdapter,
    scorer: AnswerScorer,
    tokenizer: PreTrainedTokenizerBase,
    read: int,
    max_length: int = 96,
    margin: float = DEFAULT_MARGIN,
) -> SelfCheck | None:
    """None when the spec has no examples (a description-only task cannot be checked).

    Where every checked example lists its choices, the expected output's log-likelihood is normalised over the
    choices (``log p(output) - logsumexp_c log p(c)``, each the mean per answer token, as multiple-choice scoring
    ranks them): otherwise an adapter that merely learnt the answer format ("true"/"false" after "Output:") would
    pass while picking the wrong choice more often than the base model."""
    if not spec.examples:
        return None
    examples, held_out = check_examples(spec, read)
    choices = all(e.choices for e in examples)
    scores = scorer(encode_groups(tokenizer, examples, max_length, choices), [None, adapter])
    if not choices:
        return SelfCheck(float(scores[0].mean()), float(scores[1].mean()), len(examples), held_out, margin)
    (base, base_correct), (tuned, tuned_correct) = (
        _choice_scores(examples, scores[0]),
        _choice_scores(examples, scores[1]),
    )
    return SelfCheck(base, tuned, len(examples), held_out, margin, base_correct, tuned_correct)


def _choice_scores(examples: Sequence[Example], scores: torch.Tensor) -> tuple[float, int]:
    """The mean over examples of the expected output's score normalised over the example's choices, and how many
    examples have the expected output as their top choice."""
    total, correct, offset = 0.0, 0, 0
    for example in examples:
        assert example.choices is not None
        n = len(example.choices)
        row = scores[offset : offset + n]
        expected = example.choices.index(example.output)
        total += float(row[expected] - torch.logsumexp(row, dim=0))
        correct += int(int(torch.argmax(row)) == expected)
        offset += n
    return total / len(examples), correct


class LoraModelScorer:
    """An ``AnswerScorer`` over a ``LoraModel`` (offline pipeline, CLI, tests): one pass per adapter."""

    def __init__(self, lora: LoraModel, pad_id: int, batch_size: int = 8) -> None:
        self.lora = lora
        self.pad_id = pad_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, groups: Sequence[AnswerGroup], adapters: Sequence[GeneratedAdapter | None]) -> torch.Tensor:
        rows = []
        for adapter in adapters:
            if adapter is None:
                with self.lora.base_only() as model:
                    rows.append(self._score(model, groups))
            else:
                self.lora.load_tensors(adapter.tensors)
                rows.append(self._score(self.lora.model, groups))
        return torch.stack(rows)

    def _score(self, model: torch.nn.Module, groups: Sequence[AnswerGroup]) -> torch.Tensor:
        return torch.cat(
            [
                packed_answer_logprobs(model, pack_groups(groups[start : start + self.batch_size], self.pad_id)).cpu()
                for start in range(0, len(groups), self.batch_size)
            ]
        )
