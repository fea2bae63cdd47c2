"""The self-check of a generated adapter: does it explain the task's own examples better than the base model?

Both models score the expected output of each example given its prompt (``format_prompt``), as the mean
log-likelihood per answer token (the end-of-sequence token is left out, so an adapter is not credited for knowing
where to stop); for multiple-choice examples that likelihood is normalised over the example's choices, so that
learning the answer format alone does not pass. Examples the task vector did not read are used when there are at
least ``MIN_HELD_OUT`` of them (``held_out: true``); otherwise all examples are scored in-sample and the result says
so. The check is a guard, not a benchmark: its job is to catch an adapter that makes the task's answers less likely
than no adapter does.

Each example is one ``AnswerGroup`` (its prompt and its choices, or its expected output), packed into one row so the
prompt is read once for all its choices, and a scorer may score the base model and the adapter in the same forward
pass (the engine does: its rows carry their own adapter slots).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    base: float
    adapter: float
    examples: int
    held_out: bool
    margin: float = DEFAULT_MARGIN

    @property
    def delta(self) -> float:
        return self.adapter - self.base

    @property
    def passed(self) -> bool:
        return self.delta >= -self.margin

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "base_loglik": round(self.base, 6),
            "adapter_loglik": round(self.adapter, 6),
            "delta": round(self.delta, 6),
            "examples": self.examples,
            "held_out": self.held_out,
            "passed": self.passed,
        }


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
    if choices:
        base, tuned = _choice_loglik(examples, scores[0]), _choice_loglik(examples, scores[1])
    else:
        base, tuned = float(scores[0].mean()), float(scores[1].mean())
    return SelfCheck(base=base, adapter=tuned, examples=len(examples), held_out=held_out, margin=margin)


def _choice_loglik(examples: Sequence[Example], scores: torch.Tensor) -> float:
    """Mean over examples of the expected output's score normalised over the example's choices."""
    total, offset = 0.0, 0
    for example in examples:
        assert example.choices is not None
        n = len(example.choices)
        row = scores[offset : offset + n]
        total += float(row[example.choices.index(example.output)] - torch.logsumexp(row, dim=0))
        offset += n
    return total / len(examples)


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
