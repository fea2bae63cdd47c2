"""Scorers: multiple choice by log-likelihood, exact match by greedy decoding.

Both take a model that is ready to run (the base model, or the wrapped model with some LoRA loaded) and a prompt
prefix (empty, or in-context examples), so every variant of the quality report goes through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from generator.batching import (
    AnswerGroup,
    encode_group,
    encode_prompt,
    group_length,
    pack_groups,
    packed_answer_logprobs,
)
from generator.tasks import DEMO_SEPARATOR, Example, Task, format_prompt, format_target

CausalLM = PreTrainedModel | PeftModel


@torch.inference_mode()
def multiple_choice_correct(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: str = "",
    max_length: int = 96,
    max_tokens: int = 4096,
) -> list[float]:
    """Per example: 1.0 when its highest mean-log-likelihood choice is the right one, else 0.0.

    Each example is one segment of a packed row (``generator.batching.pack_groups``): its prompt read once, then
    every choice with the positions it would have right after the prompt, attending to the prompt and itself only;
    the output head runs only where a choice token is predicted. Examples of similar width share a forward pass (up
    to ``max_tokens`` tokens). The prompt is cut from the left to leave room for the longest choice, the same cut for
    every choice.
    """
    groups = []
    for example in examples:
        if example.choices is None:
            raise ValueError("multiple_choice_correct needs examples with choices")
        prompt = prefix + format_prompt(example.input)
        groups.append(encode_group(tokenizer, prompt, [format_target(c) for c in example.choices], max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    means: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    for batch in _token_batches(groups, max_tokens):
        packed = pack_groups([groups[k] for k in batch], int(pad or 0))
        scores = packed_answer_logprobs(model, packed).cpu()
        offset = 0
        for k in batch:
            n = len(groups[k].answers)
            means[k] = scores[offset : offset + n]
            offset += n
    correct: list[float] = []
    for example, scores in zip(examples, means, strict=True):
        assert example.choices is not None
        correct.append(float(example.choices[int(torch.argmax(scores))] == example.output))
    return correct


def _token_batches(groups: Sequence[AnswerGroup], max_tokens: int) -> list[list[int]]:
    """Group indices in batches of similar packed width, each at most ``max_tokens`` (rows x width) unless one row
    alone is wider."""
    width = [group_length(g) for g in groups]
    batches: list[list[int]] = []
    current: list[int] = []
    for k in sorted(range(len(groups)), key=lambda i: width[i]):
        if current and (len(current) + 1) * width[k] > max_tokens:
            batches.append(current)
            current = []
        current.append(k)
    if current:
        batches.append(current)
    return batches


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
