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


@dataclass(frozen=True)
class AnswerGroup:
    """A prompt and the answers scored after it: the expected output of a generative example, or every choice of a
    multiple-choice one. ``pack_groups`` lays a group out as one row, so the prompt is read once for all its answers."""

    prompt: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]


def encode_group(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str], max_length: int
) -> AnswerGroup:
    """The tokens ``encode_pair`` gives each (prompt, answer), sharing one prompt: answers are cut to
    ``max_length // 2`` tokens and the prompt from the left so that it fits with the longest answer."""
    if not answers:
        raise ValueError("a group needs at least one answer")
    encoded = [list(tokenizer(a, add_special_tokens=False)["input_ids"])[: max(1, max_length // 2)] for a in answers]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = max_length - len(bos) - max(len(a) for a in encoded)
    kept = list(prompt_ids[-room:]) if room > 0 else []
    return AnswerGroup(prompt=tuple(bos + kept), answers=tuple(tuple(a) for a in encoded))


@dataclass
class PackedBatch:
    """Groups packed one per row: the prompt, then each answer with the positions it would have right after the
    prompt, attending to the prompt and to its own earlier tokens only (``mask``, additive, [rows, 1, T, T]).
    Answer token ``i`` (of ``targets``) is predicted by the logits at flat position ``sources[i]`` (row * T + column)
    and belongs to answer ``owners[i]`` (answers numbered across the batch in order)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    answers: int


def pack_groups(groups: Sequence[AnswerGroup], pad_id: int) -> PackedBatch:
    if not groups:
        raise ValueError("no groups to pack")
    width = max(len(g.prompt) + sum(len(a) for a in g.answers) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    allowed = torch.zeros((len(groups), width, width), dtype=torch.bool)
    allowed[:, torch.arange(width), torch.arange(width)] = True  # padding attends to itself: no empty softmax row
    sources: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    answer = 0
    for row, group in enumerate(groups):
        plen = len(group.prompt)
        if plen == 0:
            raise ValueError("a group needs a prompt (at least a BOS token) to predict its first answer token")
        input_ids[row, :plen] = torch.tensor(group.prompt, dtype=torch.long)
        positions[row, :plen] = torch.arange(plen)
        allowed[row, :plen, :plen] = torch.ones((plen, plen), dtype=torch.bool).tril()
        start = plen
        for tokens in group.answers:
            n = len(tokens)
            end = start + n
            input_ids[row, start:end] = torch.tensor(tokens, dtype=torch.long)
            positions[row, start:end] = torch.arange(plen, plen + n)
            allowed[row, start:end, :plen] = True
            allowed[row, start:end, start:end] = torch.ones((n, n), dtype=torch.bool).tril()
            previous = [plen - 1, *range(start, end - 1)]
            sources.extend(row * width + p for p in previous)
            targets.extend(tokens)
            owners.extend([answer] * n)
            answer += 1
            start = end
    return PackedBatch(
        input_ids=input_ids,
        position_ids=positions,
        allowed=allowed.unsqueeze(1),
        sources=torch.tensor(sources, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owners=torch.tensor(owners, dtype=torch.long),
        answers=answer,
    )


def packed_answer_logprobs(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """[batch.answers] mean log-probability per answer token (fp32, on the model's device), with the output head
    applied only where an answer token is predicted. ``model``: a transformers causal LM, or a peft model around one."""
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    allowed = batch.allowed.to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    decoder, head = getattr(model, "get_decoder")(), getattr(model, "get_output_embeddings")()  # noqa: B009
    assert isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module)
    hidden = decoder(
        input_ids=batch.input_ids.to(device),
        attention_mask=mask,
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    ).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.sources.to(device))
    logits = head(picked).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    chosen = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets.to(device).unsqueeze(-1)).squeeze(-1)
    owners = batch.owners.to(device)
    total = torch.zeros(batch.answers, device=device).index_add_(0, owners, chosen)
    count = torch.zeros(batch.answers, device=device).index_add_(0, owners, torch.ones_like(chosen))
    return total / count
