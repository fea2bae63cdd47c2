"""Scorers: multiple choice by log-likelihood, exact match by greedy decoding.

Both take a model that is ready to run (the base model, or the wrapped model with some LoRA loaded) and a prompt
prefix (empty, or in-context examples), so every variant of the quality report goes through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from generator.batching import answer_logprobs, encode_pair, encode_prompt, pad_pairs
from generator.tasks import DEMO_SEPARATOR, Example, Task, format_prompt, format_target

CausalLM = PreTrainedModel | PeftModel


@torch.inference_mode()
def multiple_choice_correct(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: str = "",
    max_length: int = 96,
    batch_size: int = 32,
) -> list[float]:
    """Per example: 1.0 when its highest mean-log-likelihood choice is the right one, else 0.0.

    The choices of several examples go through one forward pass (``batch_size`` sequences at a time).
    """
    pairs = []
    for example in examples:
        if example.choices is None:
            raise ValueError("multiple_choice_correct needs examples with choices")
        prompt = prefix + format_prompt(example.input)
        pairs += [encode_pair(tokenizer, prompt, format_target(choice), max_length) for choice in example.choices]
    scores = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k].ids))  # similar lengths batch with little padding
    device = _device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_pairs([pairs[k] for k in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        total, count = answer_logprobs(logits, batch.labels.to(device))
        scores[idx] = (total / count.clamp_min(1)).cpu()
    correct: list[float] = []
    offset = 0
    for example in examples:
        assert example.choices is not None
        n = len(example.choices)
        best = int(torch.argmax(scores[offset : offset + n]))
        correct.append(float(example.choices[best] == example.output))
        offset += n
    return correct


@torch.inference_mode()
def exact_match_correct(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: str = "",
    max_length: int = 96,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[float]:
    """Per example: 1.0 when the greedy continuation (first line, stripped) equals the expected output.

    Prompts are left-padded into batches; generation stops at the end-of-sequence token or ``max_new_tokens``."""
    pad = int(tokenizer.pad_token_id)
    device = _device(model)
    correct: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [encode_prompt(tokenizer, prefix + format_prompt(e.input), max_length) for e in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        for example, generated in zip(chunk, out[:, width:], strict=True):
            text = str(tokenizer.decode(generated, skip_special_tokens=True))
            correct.append(float(text.strip().split("\n")[0].strip() == example.output.strip()))
    return correct


def score_examples(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: Task, prefix: str = "", max_length: int = 96
) -> list[float]:
    """The task's metric per test example: multiple choice when every test example has choices, else exact match."""
    if task.is_multiple_choice:
        return multiple_choice_correct(model, tokenizer, task.test, prefix, max_length)
    return exact_match_correct(model, tokenizer, task.test, prefix, max_length)


def score_task(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: Task, prefix: str = "", max_length: int = 96
) -> float:
    """The task's metric on its test examples (the mean of ``score_examples``)."""
    values = score_examples(model, tokenizer, task, prefix, max_length)
    return sum(values) / max(1, len(values))


def in_context_prefix(description: str, examples: Sequence[Example]) -> str:
    """A description and examples written as a prompt prefix (in-context prompting)."""
    parts = [description.strip()] if description.strip() else []
    for example in examples:
        parts.append(format_prompt(example.input) + format_target(example.output))
    return DEMO_SEPARATOR.join(parts) + DEMO_SEPARATOR if parts else ""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
