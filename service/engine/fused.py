"""A decode step's groups and a long prompt's prefill chunk in one forward pass.

A long prompt is read in chunks between decode steps (the scheduler's ``_prefill_chunk``), so that running streams keep
decoding. On the CPU each pass has a large fixed cost, whatever its token count: it reads every weight once (SmolLM2's
540 MB in fp32) and walks 30 layers of small ops. Measured on a 2-core AMD EPYC (AVX-512, packed Linears): a decode
step of 8 rows 47 ms, a chunk of 8 tokens 69 ms, a pass of 16 tokens 87 ms. So a chunk in a pass of its own makes the
streams wait for a second pass, and at small chunk sizes the fixed cost dominates.

The same holds for decode groups (rows kept apart so that a long row does not pad short ones): each group was a pass
of its own, so a 2,000-token row decoding beside 8 short streams doubled their step.

Here every decode group's rows (one token each) and, while a long prompt is read, its chunk (one row, ``k`` tokens)
run as one flat sequence ``[1, B + k]`` of ``Segment``s: every Linear, norm and MLP runs once over all of them, per
token, as they would apart. What is not per token is split inside the pass:

- **keys and values**: ``FusedKV.update`` writes each segment's tokens into its own cache (a group's: one position
  per row; the chunk's: ``k`` positions), as the separate passes would;
- **attention**: ``fused_attention`` (registered with transformers' ``AttentionInterface`` and switched on only for
  the pass) attends each group's queries to their rows' cached keys with the group's padding mask, and the chunk's
  queries causally to the chunk's keys, each through the attention function the model runs otherwise (SDPA or the
  engine's decode attention), then puts the outputs back in token order;
- **LoRA**: ``LoraBank.activate_split`` applies the rows' own slots to their tokens and the chunk's slot to the
  rest (``SlottedLoraLinear``);
- **positions**: each token's own, so the rotary embedding is per token as always.

Since the mask is built here, transformers builds none (an attention name without a mask function makes its mask
code return at once). The results equal the two passes' up to float rounding (a Linear over more rows may round
differently), like the packed Linears; ``tests/engine/test_fused.py`` checks greedy tokens against plain peft.

Where: the CPU (where the pass's fixed cost was measured), for models whose every layer attends to the whole prefix
through SDPA or the matmul decode attention (``fused_passes_unavailable`` says why not otherwise: sliding windows
and eager attention need masks this module does not build).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from service.engine.attention import NAME as DECODE_ATTENTION
from service.engine.attention import SDPA_ONLY
from service.engine.kv_cache import BatchKVCache

NAME = "icm_lora_fused_pass"
_INNER = ("sdpa", DECODE_ATTENTION)  # the implementations whose masks this module builds


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens of a fused pass that share one cache: a decode group (``rows`` rows, one token each, in row
    order) or a prefill chunk (one row, ``tokens`` tokens)."""

    cache: BatchKVCache
    rows: int
    tokens: int
    mask: torch.Tensor | None  # as that pass alone would give the attention (None: no padding, or a first chunk)
    lengths: list[int] | None = None  # a decode group's real row lengths (the low-precision decode attention's)

    @property
    def size(self) -> int:
        return self.rows * self.tokens


@dataclass
class FusedKV:
    """The cache of one fused pass over ``segments``, in token order. ``update`` is what the model's attention layers
    call; ``fused_attention`` reads what it wrote (``layers``)."""

    segments: list[Segment]
    inner: str  # the attention implementation the model runs outside fused passes
    layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        written = []
        start = 0
        for segment in self.segments:  # [1, KVH, T, D] -> each segment's own shape
            k = _rows_of(key_states[:, :, start : start + segment.size], segment)
            v = _rows_of(value_states[:, :, start : start + segment.size], segment)
            written.append(segment.cache.update(k, v, layer_idx))
            start += segment.size
        self.layers[layer_idx] = written
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked only when no position ids are given
        raise RuntimeError("a fused pass needs explicit position ids")


def _rows_of(flat: torch.Tensor, segment: Segment) -> torch.Tensor:
    """[1, heads, rows * tokens, D] -> [rows, heads, tokens, D] (a decode group's tokens become one position each)."""
    return flat.transpose(0, 2) if segment.tokens == 1 else flat


_CURRENT: ContextVar[FusedKV | None] = ContextVar("icm_lora_fused_pass", default=None)


def fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    decode_lengths: list[int] | None = None,
    **kwargs: torch.Tensor | None,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; ``query`` [1, H, T, D] -> ([1, T, H, D], None)."""
    fused = _CURRENT.get()
    if fused is None:
        raise RuntimeError("fused_attention runs only inside fused_pass()")
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise RuntimeError("fused_attention needs the attention module's layer_idx")
    attend = ALL_ATTENTION_FUNCTIONS[fused.inner]
    outputs = []
    start = 0
    plain_sdpa = not any(kwargs.get(name) is not None for name in SDPA_ONLY)
    for segment, (k, v) in zip(fused.segments, fused.layers[layer_idx], strict=True):
        q = _rows_of(query[:, :, start : start + segment.size], segment)
        if segment.tokens > 1 and plain_sdpa:
            out = chunk_attention(q, k, v, segment.mask, scaling)
        else:
            out, _ = attend(module, q, k, v, segment.mask, scaling=scaling, decode_lengths=segment.lengths, **kwargs)
        outputs.append(out.transpose(0, 1) if segment.tokens == 1 else out)  # [rows, 1, H, D] -> [1, rows, H, D]
        start += segment.size
    return torch.cat(outputs, dim=1), None


def chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """A chunk's queries [1, H, k, D] over its prefix and itself (key / value [1, KVH, done + k, D]) -> [1, k, H, D].

    SDPA runs on the key/value heads (``enable_gqa``). transformers' SDPA path, given a mask, first copies every key
    and value once per query head sharing it (``repeat_kv``): for a chunk that is the prompt's whole prefix, in every
    layer, at every step, so the chunk's cost grew with the prefix (SmolLM2, 8 streams, 8-token chunks at a 1,700-token
    prefix: 47 of a 99 ms step were those copies). Same result up to float rounding. ``mask`` None: a first chunk
    (causal over itself, as transformers would run it)."""
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=mask is None, enable_gqa=groups > 1
    )
    return out.transpose(1, 2)


AttentionInterface.register(NAME, fused_attention)  # no mask function: transformers then builds no mask for it


def fused_passes_unavailable(model: PreTrainedModel, device: torch.device) -> str | None:
    """None when the scheduler may fuse prefill chunks into decode steps for ``model`` on ``device``, else why not."""
    if device.type != "cpu":
        return f"measured on the CPU only (the model is on {device})"
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _INNER:
        return f"the model runs {implementation!r} attention (fused passes build SDPA's masks only)"
    layer_types = getattr(config, "layer_types", None) or ()
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if windowed or any(kind != "full_attention" for kind in layer_types):
        return "the model has sliding-window layers (fused passes build full-attention masks only)"
    return None


def chunk_mask(done: int, tokens: int, device: torch.device) -> torch.Tensor | None:
    """The chunk's causal mask over its prefix and itself, as transformers builds it for SDPA: None for a first
    chunk (SDPA's own causal path), else [1, 1, tokens, done + tokens] bool."""
    if done == 0:
        return None
    columns = torch.arange(done + tokens, device=device)
    rows = torch.arange(done, done + tokens, device=device)
    return (columns[None, :] <= rows[:, None])[None, None]


@contextmanager
def fused_pass(model: PreTrainedModel, kv: FusedKV) -> Iterator[None]:
    """Within: the model's attention layers run ``fused_attention`` over ``kv``."""
    config = model.config
    previous = config._attn_implementation
    if previous != kv.inner:
        raise RuntimeError(f"the model runs {previous!r} attention, the fused pass was built for {kv.inner!r}")
    token = _CURRENT.set(kv)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _CURRENT.reset(token)
