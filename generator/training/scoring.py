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
from generator.tasks import Example, Task, format_prompt, format_target

CausalLM = PreTrainedModel | PeftModel


@torch.inference_mode()
def multiple_choice_accuracy(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: str = "",
    max_length: int = 96,
    batch_size: int = 32,
) -> float:
    """Share of examples whose highest mean-log-likelihood choice is the right one.

    The choices of several examples go through one forward pass (``batch_size`` sequences at a time).
    """
    rows: list[tuple[int, int]] = []  # (example index, choice index)
    pairs = []
    for i, example in enumerate(examples):
        if example.choices is None:
            raise ValueError("multiple_choice_accuracy needs examples with choices")
        prompt = prefix + format_prompt(example.input)
        for j, choice in enumerate(example.choices):
            rows.append((i, j))
            pairs.append(encode_pair(tokenizer, prompt, format_target(choice), max_length))
    scores = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k].ids))  # similar lengths batch with little padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_pairs([pairs[k] for k in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = answer_logprobs(logits, batch.labels)
        scores[idx] = total / count.clamp_min(1)
    correct = 0
    offset = 0
    for example in examples:
        assert example.choices is not None
        n = len(example.choices)
        best = int(torch.argmax(scores[offset : offset + n]))
        correct += example.choices[best] == example.output
        offset += n
    return correct / max(1, len(examples))


@torch.inference_mode()
def exact_match(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: str = "",
    max_length: int = 96,
    max_new_tokens: int = 16,
) -> float:
    """Share of examples whose greedy continuation (first line, stripped) equals the expected output."""
    correct = 0
    for example in examples:
        ids = torch.tensor([encode_prompt(tokenizer, prefix + format_prompt(example.input), max_length)])
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        correct += text.strip().split("\n")[0].strip() == example.output.strip()
    return correct / max(1, len(examples))


def score_task(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: Task, prefix: str = "", max_length: int = 96
) -> float:
    """The task's metric on its test examples: multiple choice when every test example has choices."""
    if task.is_multiple_choice:
        return multiple_choice_accuracy(model, tokenizer, task.test, prefix, max_length)
    return exact_match(model, tokenizer, task.test, prefix, max_length)


def in_context_prefix(task: Task, n_examples: int) -> str:
    """The task's description and its first ``n_examples`` train examples, written as a prompt prefix."""
    parts = [task.description.strip()] if task.description.strip() else []
    for example in task.train[:n_examples]:
        parts.append(format_prompt(example.input) + format_target(example.output))
    return "\n\n".join(parts) + "\n\n" if parts else ""
