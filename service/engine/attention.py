"""Decode-step attention on the CPU: two batched matmuls in fp32, each row alone in bf16 / fp16.

A decode step attends one new query per row to that row's cached keys. On the CPU, SDPA's flash kernel has a fixed
cost per call that is large at these sizes: for SmolLM2-135M at batch 16 (9 query heads over 3 key/value heads,
64-dim heads, about 50 cached positions) it took 98 us per layer, where ``softmax(q @ k^T) @ v`` on the key/value
heads (no ``repeat_kv``) took 54 us (2 threads, AMD EPYC with AVX-512; 203 vs 148 us at 200 positions), and the
engine's end-to-end throughput rose 3% (502 -> 517 tok/s, 16 rows x 32 tokens, same greedy tokens).

``decode_attention`` is registered with transformers' ``AttentionInterface`` as ``icm_lora_cpu_decode``. It takes
that path only for one query against keys that include cached positions (a decode step, or the last one-token chunk
of a long prompt); every other pass goes to transformers' own ``sdpa_attention_forward`` unchanged. The passes that
make adapters (hidden-state reads, the self-check's scoring) run without a cache, so they stay bit-equal to the
offline pipeline's. The two paths differ by float rounding only (about 1e-7 relative in fp32), so greedy tokens
equal plain peft's except at near ties, as with the packed Linears.

In bf16 and fp16 a decode step attends **each row alone**, through SDPA over that row's own keys only (the
scheduler passes the rows' real lengths, known on the host, as ``decode_lengths``). SDPA's CPU kernel sums a row's
keys in vector lanes, so a row's left padding moves its keys to other lanes and changes the rounding of its result
(measured: 3 of 20 random cases differ with a padding of 1 to 24 keys; none when the padding is a multiple of 16);
in low precision that flips a token at a near tie and the row then continues differently. Alone, a row computes
exactly what plain peft computes for it, so a mixed batch gives each row its own tokens: on a CPU with native bf16
(AMD EPYC, AVX-512 BF16) the tiny model's mixed batch went from 92.8% to 100% of peft's greedy tokens. The price is
one small SDPA call per row and layer: in bf16 on that EPYC, 16 rows with 16 adapters ran at 0.79-0.80x the tok/s
of the padded SDPA (``bench/row_attention.py``); the engine makes each row's call itself since 2026-12-08 (the call
transformers' wrapper would make, without the wrapper: 1.16x in process), 0.71-0.80x in two runs on a VM of that kind
whose speed swung within each run. ``EngineConfig.attend_rows_alone`` (``ICM_LORA_ATTEND_ROWS_ALONE``,
on by default) turns it off. On the CPU fp32 is the default (``auto``), about as fast there, and not affected.

``DecodeAttention.install`` switches a model that runs SDPA on the CPU to it; ``uninstall`` switches it back.
Elsewhere (CUDA, where SDPA's kernels are fast; eager attention, e.g. Gemma 2's soft-capping)
``decode_attention_unavailable`` says why it stays off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "icm_lora_cpu_decode"
SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")  # what only the SDPA path (or none) knows how to apply


def decode_attention(
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
    """transformers' attention signature: query [B, H, Q, D], key / value [B, KVH, K, D] -> ([B, Q, H, D], None).
    ``decode_lengths``: each row's real keys (the last ones of its left-padded row), for the low-precision path."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_len != 1 or k_len == 1 or dropout or any(kwargs.get(k) is not None for k in SDPA_ONLY):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.dtype != torch.float32:
        if attention_mask is None or decode_lengths is None:  # no padding: the rows' keys are in their own lanes
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, is_causal=is_causal, **kwargs
            )
        # each row alone, through the SDPA call transformers makes for a row without a mask (enable_gqa, no
        # causal flag for one query): the same kernel on the same keys, so the same bits as plain peft's row, without
        # transformers' per-call wrapper (16 rows at 50 keys, bf16: 1.01 ms against 1.13 ms per layer)
        gqa = heads != kv_heads
        rows = [
            F.scaled_dot_product_attention(
                query[r : r + 1], key[r : r + 1, :, k_len - n :], value[r : r + 1, :, k_len - n :], scale=scaling,
                enable_gqa=gqa,
            )
            for r, n in enumerate(decode_lengths)
        ]  # fmt: skip
        return torch.cat(rows).transpose(1, 2), None  # [B, H, 1, D] -> [B, 1, H, D]
    groups = heads // kv_heads  # query heads per key/value head, in repeat_kv's order
    q = query.reshape(batch, kv_heads, groups, dim)
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, KVH, G, K]
    scores.mul_(scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:
        mask = attention_mask  # [B, 1 or H, 1, K], as SDPA takes it
        if mask.shape[1] == heads:
            mask = mask.reshape(batch, kv_heads, groups, k_len)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [B, KVH, G, D]
    return out.reshape(batch, 1, heads, dim), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes: the other passes go there


def decode_attention_unavailable(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``install`` would switch ``model`` to the matmul decode attention, else why not (for the log)."""
    if device.type != "cpu":
        return f"SDPA's own kernels serve {device}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no decode attention path for {dtype}"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"the model runs {implementation!r} attention, not SDPA"
    return None


class DecodeAttention:
    """Switches one model's attention to ``decode_attention`` and back."""

    def __init__(self) -> None:
        self._model: PreTrainedModel | None = None
        self._previous: str | None = None

    @property
    def installed(self) -> bool:
        return self._model is not None

    def install(self, model: PreTrainedModel) -> None:
        if self._model is not None:
            raise RuntimeError("the decode attention is already installed")
        self._previous = model.config._attn_implementation
        model.config._attn_implementation = NAME  # read by every attention layer on each forward pass
        self._model = model

    def uninstall(self) -> None:
        if self._model is not None:
            self._model.config._attn_implementation = self._previous
            self._model = None
