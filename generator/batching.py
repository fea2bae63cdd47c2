"""Tokenising (prompt, answer) pairs and padding them into batches.

Shared by LoRA training (loss on the answer tokens only) and scoring (log-likelihood of each answer), so both see
exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of prompt + answer; ``answer_start`` is where the answer's tokens begin."""

    ids: tuple[int, ...]
    answer_start: int


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int, end: bool = False
) -> EncodedPair:
    """Tokenise prompt and answer separately (so the boundary is exact) and cut the prompt from the left if needed.

    The end of the prompt ("... Output:") is what matters for the answer, so long prompts lose their beginning.
    ``end``: the answer is followed by the tokenizer's end-of-sequence token (training targets, so that a completion
    stops after the answer); scoring leaves it out, so choices are compared on their own tokens.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    answer_ids = answer_ids[: max(1, max_length // 2)]
    if end and tokenizer.eos_token_id is not None:
        answer_ids.append(int(tokenizer.eos_token_id))
    room = max_length - len(bos) - len(answer_ids)
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    ids = bos + list(prompt_ids) + list(answer_ids)
    return EncodedPair(ids=tuple(ids), answer_start=len(bos) + len(prompt_ids))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> list[int]:
    """Prompt ids with BOS, cut from the left to ``max_length``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(ids[-(max_length - len(bos)) :])


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def pad_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> PaddedBatch:
    """Right-pad to the longest pair; labels are the answer tokens, everything else ``IGNORE_INDEX``."""
    width = max(len(p.ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, pair in enumerate(pairs):
        ids = torch.tensor(pair.ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, pair.answer_start : len(ids)] = ids[pair.answer_start :]
    return PaddedBatch(input_ids, attention, labels)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the label tokens per row, and their count (logits predict the next token)."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    logprobs = torch.log_softmax(shifted_logits, dim=-1)
    picked = logprobs.gather(-1, shifted_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)
