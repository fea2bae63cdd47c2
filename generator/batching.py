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
    multiple-choice one. ``pack_groups`` lays a group out as one segment of a row, so the prompt is read once for all
    its answers."""

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
    """Groups packed into rows: each group is a segment (its prompt, then each answer with the positions it would
    have right after the prompt, attending to the prompt and to its own earlier tokens only; ``mask``, boolean,
    [rows, 1, T, T]); a row holds as many groups as fit in the width of the longest one (``layout_rows``).
    Answer token ``i`` (of ``targets``) is predicted by the logits at flat position ``sources[i]`` (row * T + column)
    and belongs to answer ``owners[i]`` (answers numbered across the groups in order, copy after copy).
    ``rows_per_copy``: the rows of one copy of the groups (``pack_groups``' ``copies``)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    answers: int
    rows_per_copy: int = 1


def group_length(group: AnswerGroup) -> int:
    return len(group.prompt) + sum(len(a) for a in group.answers)


def layout_rows(lengths: Sequence[int]) -> list[list[int]]:
    """Group indices per row: first fit, longest first, into rows as wide as the longest group, so that short
    groups share a row instead of each padding one to that width (a batch's forward pass costs its rows x width)."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[k] <= free:
                rows[r].append(k)
                room[r] -= lengths[k]
                break
        else:
            rows.append([k])
            room.append(width - lengths[k])
    return rows


def pack_groups(groups: Sequence[AnswerGroup], pad_id: int, copies: int = 1) -> PackedBatch:
    """``groups`` laid out by ``layout_rows``, ``copies`` times (the engine scores the base model and each adapter
    on a copy of its own: every row holds groups of one copy only)."""
    if not groups:
        raise ValueError("no groups to pack")
    if any(not g.prompt for g in groups):
        raise ValueError("a group needs a prompt (at least a BOS token) to predict its first answer token")
    lengths = [group_length(g) for g in groups]
    layout = layout_rows(lengths)
    width = max(lengths)
    first_answer = [0]
    for group in groups:
        first_answer.append(first_answer[-1] + len(group.answers))
    per_copy = first_answer[-1]
    rows = len(layout) * copies
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    allowed = torch.zeros((rows, width, width), dtype=torch.bool)
    allowed[:, torch.arange(width), torch.arange(width)] = True  # padding attends to itself: no empty softmax row
    sources: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    for copy in range(copies):
        for r, members in enumerate(layout):
            row = copy * len(layout) + r
            offset = 0
            for k in members:
                group = groups[k]
                plen = len(group.prompt)
                prompt_end = offset + plen
                input_ids[row, offset:prompt_end] = torch.tensor(group.prompt, dtype=torch.long)
                positions[row, offset:prompt_end] = torch.arange(plen)
                allowed[row, offset:prompt_end, offset:prompt_end] = torch.ones((plen, plen), dtype=torch.bool).tril()
                start = prompt_end
                for j, tokens in enumerate(group.answers):
                    n = len(tokens)
                    end = start + n
                    input_ids[row, start:end] = torch.tensor(tokens, dtype=torch.long)
                    positions[row, start:end] = torch.arange(plen, plen + n)
                    allowed[row, start:end, offset:prompt_end] = True
                    allowed[row, start:end, start:end] = torch.ones((n, n), dtype=torch.bool).tril()
                    previous = [prompt_end - 1, *range(start, end - 1)]
                    sources.extend(row * width + p for p in previous)
                    targets.extend(tokens)
                    owners.extend([copy * per_copy + first_answer[k] + j] * n)
                    start = end
                offset = start
    return PackedBatch(
        input_ids=input_ids,
        position_ids=positions,
        allowed=allowed.unsqueeze(1),
        sources=torch.tensor(sources, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owners=torch.tensor(owners, dtype=torch.long),
        answers=per_copy * copies,
        rows_per_copy=len(layout),
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
