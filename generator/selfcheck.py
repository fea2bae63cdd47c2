"""The self-check of a generated adapter: does it explain the task's own examples better than the base model?

Both models score the expected output of each example given its prompt (``format_prompt``), as the mean
log-likelihood per answer token (the end-of-sequence token is left out, so an adapter is not credited for knowing
where to stop); for multiple-choice examples that likelihood is normalised over the example's choices, so that
learning the answer format alone does not pass. Examples the task vector did not read are used when there are at
least ``MIN_HELD_OUT`` of them (``held_out: true``); otherwise all examples are scored in-sample and the result says
so. The check is a guard, not a benchmark: its job is to catch an adapter that makes the task's answers less likely
than no adapter does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from generator.adapter import GeneratedAdapter
from generator.batching import EncodedPair, answer_logprobs, encode_pair, pad_pairs
from generator.lora_model import LoraModel
from generator.tasks import Example, TaskSpec, format_prompt, format_target

MIN_HELD_OUT = 2
DEFAULT_MARGIN = 0.0

SelfCheckPolicy = Literal["fallback", "refine", "keep"]
"""What a service does with an adapter that fails its self-check: serve the base model and say so (``fallback``),
refine the adapter on the examples (``refine``; the base model is served until the refined adapter passes), or serve
it anyway with a warning (``keep``)."""

AnswerScorer = Callable[[Sequence[EncodedPair], GeneratedAdapter | None], torch.Tensor]
"""(pairs, adapter or None for the base model) -> [len(pairs)] mean log-probability per answer token."""


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


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[EncodedPair]:
    return [encode_pair(tokenizer, format_prompt(e.input), format_target(e.output), max_length) for e in examples]


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
    if all(e.choices for e in examples):
        choices = [c for e in examples for c in (e.choices or ())]
        prompts = [e for e in examples for _ in (e.choices or ())]
        pairs = [
            encode_pair(tokenizer, format_prompt(e.input), format_target(c), max_length)
            for e, c in zip(prompts, choices, strict=True)
        ]
        base = _choice_loglik(examples, scorer(pairs, None))
        tuned = _choice_loglik(examples, scorer(pairs, adapter))
    else:
        pairs = encode_answers(tokenizer, examples, max_length)
        base = float(scorer(pairs, None).mean())
        tuned = float(scorer(pairs, adapter).mean())
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
    """An ``AnswerScorer`` over a ``LoraModel`` (offline pipeline, CLI, tests)."""

    def __init__(self, lora: LoraModel, pad_id: int, batch_size: int = 16) -> None:
        self.lora = lora
        self.pad_id = pad_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, pairs: Sequence[EncodedPair], adapter: GeneratedAdapter | None) -> torch.Tensor:
        if adapter is None:
            with self.lora.base_only() as model:
                return self._score(model, pairs)
        self.lora.load_tensors(adapter.tensors)
        return self._score(self.lora.model, pairs)

    def _score(self, model: torch.nn.Module, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        out = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pad_pairs(pairs[start : start + self.batch_size], self.pad_id)
            device = next(model.parameters()).device
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            total, count = answer_logprobs(logits, batch.labels.to(device))
            out.append((total / count.clamp_min(1)).cpu())
        return torch.cat(out)
