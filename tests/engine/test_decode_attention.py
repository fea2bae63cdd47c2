"""Decode-step attention as batched matmuls (``EngineConfig.matmul_decode_attention``, the service's default on the
CPU in float32): equal to transformers' SDPA path up to float rounding for one query against cached keys, and that
very path (bit for bit) for every other pass, so the passes that make adapters do not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from generator.base_model import load_base_model
from generator.device import Placement
from service.engine import Engine, EngineConfig
from service.engine.attention import NAME, decode_attention, decode_attention_unavailable
from tests.engine.conftest import PROMPTS, MakeAdapter
from tests.engine.parity import TEST_DEVICE, assert_equal_up_to_near_ties, run_parity

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="the matmul decode attention is a CPU path")


class _Attention(nn.Module):
    """What ``sdpa_attention_forward`` reads off an attention layer."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(q_len: int, k_len: int, batch: int = 4, heads: int = 9, kv_heads: int = 3, dim: int = 16):
    generator = torch.Generator().manual_seed(q_len * 1000 + k_len)
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    value = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    return _Attention(heads // kv_heads), query, key, value


def _padding(batch: int, k_len: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
    mask[0, ..., :5] = False  # a left-padded row
    mask[2, ..., :1] = False
    return mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
def test_one_query_against_cached_keys_matches_sdpa(mask_kind: str) -> None:
    module, query, key, value = _qkv(1, 40)
    padding = _padding(4, 40)
    mask = {
        "none": None,
        "bool": padding,
        "additive": torch.zeros(padding.shape).masked_fill_(~padding, torch.finfo(torch.float32).min),
        "per_head": padding.expand(4, 9, 1, 40),
    }[mask_kind]
    got, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (4, 1, 9, 16)
    assert torch.allclose(got, want, atol=1e-6)
    if mask is not None:  # the padding really counted
        unmasked, _ = decode_attention(module, query, key, value, None, scaling=0.25)
        assert not torch.allclose(got[0], unmasked[0], atol=1e-3)


@pytest.mark.parametrize(("q_len", "k_len"), [(7, 7), (1, 1), (3, 10)])
def test_every_other_pass_is_sdpa_bit_for_bit(q_len: int, k_len: int) -> None:
    module, query, key, value = _qkv(q_len, k_len)
    got, _ = decode_attention(module, query, key, value, None, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_low_precision_each_row_attends_as_it_would_alone(dtype: torch.dtype) -> None:
    """Left-padded rows give, bit for bit, what SDPA gives each row over its own keys (plain peft's decode step)."""
    module, query, key, value = _qkv(1, 40, batch=4)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    lengths = [40 - pad for pad in (5, 0, 1, 17)]
    padding = torch.ones(4, 1, 1, 40, dtype=torch.bool)
    for row, n in enumerate(lengths):
        padding[row, ..., : 40 - n] = False
    got, _ = decode_attention(module, query, key, value, padding, scaling=0.25, decode_lengths=lengths)
    for row, n in enumerate(lengths):
        alone, _ = sdpa_attention_forward(
            module, query[row : row + 1], key[row : row + 1, :, 40 - n :], value[row : row + 1, :, 40 - n :], None,
            scaling=0.25,
        )  # fmt: skip
        assert torch.equal(got[row : row + 1], alone)
    padded, _ = sdpa_attention_forward(module, query, key, value, padding, scaling=0.25)  # what it replaces: close
    assert torch.allclose(got.float(), padded.float(), atol=0.02)


def test_low_precision_engines_attend_rows_alone_unless_told_not_to() -> None:
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    for alone in (True, False):
        with Engine(load_base_model("tiny", placement=placement), EngineConfig(attend_rows_alone=alone)) as engine:
            assert engine.attention.installed == alone
    with Engine(load_base_model("tiny"), EngineConfig(attend_rows_alone=True)) as engine:
        assert not engine.attention.installed  # fp32: the matmul path is its own setting (off here)


def test_says_where_it_stays_off() -> None:
    model = load_base_model("tiny").model
    assert decode_attention_unavailable(model, torch.device("cpu"), torch.float32) is None
    assert "cuda" in str(decode_attention_unavailable(model, torch.device("cuda"), torch.float32))
    assert decode_attention_unavailable(model, torch.device("cpu"), torch.bfloat16) is None  # rows alone
    assert "float64" in str(decode_attention_unavailable(model, torch.device("cpu"), torch.float64))
    model.config._attn_implementation = "eager"
    assert "eager" in str(decode_attention_unavailable(model, torch.device("cpu"), torch.float32))


def test_generation_matches_peft_in_fp32(adapter: MakeAdapter, tmp_path: Path) -> None:
    placement = Placement(TEST_DEVICE, torch.float32)
    adapters = [None, adapter(1), adapter(2), adapter(3)]
    parity = run_parity(
        lambda: load_base_model("tiny", placement=placement), adapters, PROMPTS, 32, tmp_path, decode_attention=True
    )
    assert_equal_up_to_near_ties(parity)


def test_the_engine_switches_it_on_and_back_and_adapters_are_made_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    decode_steps = []

    def counting(module: nn.Module, query: torch.Tensor, *args: object, **kwargs: object) -> object:
        decode_steps.append(query.shape[2] == 1)
        return decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, counting)
    with Engine(load_base_model("tiny"), EngineConfig(num_slots=2)) as plain:
        fast = Engine(load_base_model("tiny"), EngineConfig(num_slots=2, matmul_decode_attention=True))
        model = fast.model
        assert fast.attention.installed and model.config._attn_implementation == NAME
        assert plain.model.config._attn_implementation == "sdpa"
        texts = list(PROMPTS)  # the task encoder's read: no cache, so SDPA, bit for bit
        assert torch.equal(fast.hidden_state_reader()(texts), plain.hidden_state_reader()(texts))
        got = fast.generate(PROMPTS[0], max_tokens=8, ignore_eos=True)
        want = plain.generate(PROMPTS[0], max_tokens=8, ignore_eos=True)
        assert got.token_ids == want.token_ids
        layers = fast.model.config.num_hidden_layers
        assert sum(decode_steps) == 7 * layers  # 8 tokens: a prefill, then 7 decode steps through every layer
        fast.close()
    assert model.config._attn_implementation == "sdpa"
    assert not fast.attention.installed
