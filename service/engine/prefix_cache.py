"""The chat template's opening, prefilled once per adapter.

Every chat prompt starts with the same tokens: the template's default system turn and the start of the user turn
(SmolLM2: 24 tokens, 63% of a one-line question's 38). Their keys and values depend only on the adapter that reads
them (a LoRA on the attention changes the values of every layer, and the hidden states after the first), so they are
kept per adapter id (content-addressed, so an id always names the same weights), least recently used dropped first.
A prefill whose rows all start with the opening and whose adapters all have an entry reads only the rest of each
prompt, after the opening's keys and values are copied into the new cache; any other prefill reads everything and
leaves an entry for each adapter that lacked one. Causal attention makes the opening's keys and values the same
whatever follows it, so the result equals a full prefill up to float rounding (``tests/engine/test_prefix_cache.py``
checks greedy tokens against plain peft).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from service.engine.kv_cache import BatchKVCache


class PrefixRow(Protocol):
    """What the cache needs of a request: its prompt and the id of its adapter (None: the base model)."""

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def adapter_id(self) -> str | None: ...


class ChatEncoder(Protocol):
    """``engine.chat_token_ids``: a tokenizer and messages -> the chat prompt's token ids."""

    def __call__(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]: ...


def chat_opening(tokenizer: PreTrainedTokenizerBase, encode: ChatEncoder) -> tuple[int, ...]:
    """The tokens every chat prompt of one user message starts with: the common prefix of two prompts whose contents
    differ from their first character (empty without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return ()
    try:
        a = encode(tokenizer, [{"role": "user", "content": "a"}])
        b = encode(tokenizer, [{"role": "user", "content": "b"}])
    except Exception:  # a template that needs more than one user message: no opening to share
        return ()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return tuple(a[:n])


class PrefixCache:
    """Keys and values of ``opening`` per adapter id, at most ``entries`` of them (0: off)."""

    def __init__(self, opening: tuple[int, ...], entries: int) -> None:
        self.opening = opening if entries > 0 else ()
        self.entries = entries
        self._kv: OrderedDict[str | None, tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.hits_total = 0  # rows prefilled after the opening's cached keys and values
        self.misses_total = 0  # rows that started with the opening and were prefilled in full

    def _opens(self, row: PrefixRow) -> bool:
        n = len(self.opening)
        return n > 0 and len(row.prompt_ids) > n and tuple(row.prompt_ids[:n]) == self.opening

    def covers(self, rows: Sequence[PrefixRow]) -> int:
        """Tokens a prefill of ``rows`` can skip: the opening's length when every row starts with it and has an
        entry for its adapter, else 0."""
        if not all(self._opens(r) and r.adapter_id in self._kv for r in rows):
            return 0
        for r in rows:
            self._kv.move_to_end(r.adapter_id)
        self.hits_total += len(rows)
        return len(self.opening)

    def seed(self, cache: BatchKVCache, rows: Sequence[PrefixRow], room: int) -> None:
        """Write the opening's keys and values of each row's adapter into the empty ``cache``, with room for
        ``room`` more positions."""
        entries = [self._kv[r.adapter_id] for r in rows]
        layers = range(len(entries[0][0]))
        keys = [torch.cat([e[0][i] for e in entries]) for i in layers]
        values = [torch.cat([e[1][i] for e in entries]) for i in layers]
        cache.start_from(keys, values, room)

    def remember(self, cache: BatchKVCache, rows: Sequence[PrefixRow]) -> int:
        """After a full prefill of ``rows`` (left-padded into ``cache``): keep the opening's keys and values of each
        adapter that has no entry yet; return how many rows started with the opening (misses)."""
        n = len(self.opening)
        width = cache.length
        misses = 0
        for i, row in enumerate(rows):
            if not self._opens(row):
                continue
            misses += 1
            if row.adapter_id in self._kv:
                continue
            self._kv[row.adapter_id] = cache.span(i, width - len(row.prompt_ids), n)
            while len(self._kv) > self.entries:
                self._kv.popitem(last=False)
        self.misses_total += misses
        return misses
