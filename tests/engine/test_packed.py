"""Generation on oneDNN-packed Linear weights (``EngineConfig.packed_linears``, the service's default on the CPU).

Packed results differ from ``F.linear`` by float rounding only, so greedy tokens equal plain peft's except where a
row meets a near tie (none on the fixed prompt set in fp32; measured on an AMD EPYC with AVX-512 BF16: 100% alone and
mixed). The passes that make adapters (hidden-state reads, the self-check's scoring) run on the plain weights and
stay bit-equal to an engine without packing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.device import Placement
from service.engine import Engine, EngineConfig
from service.engine import packed as packed_module
from service.engine.lora_layers import SlottedLoraLinear
from service.engine.packed import (
    GATED_MLPS,
    FusedGateUpMLP,
    FusedQKVAttention,
    PackedLinear,
    PackedWeights,
    packing_unavailable,
    rotate_together,
)
from tests.engine.conftest import PROMPTS, MakeAdapter, make_adapter
from tests.engine.parity import TEST_DEVICE, assert_equal_up_to_near_ties, run_parity

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="packed Linears are a CPU path")


def test_packing_is_available_on_this_cpu_and_says_why_not_elsewhere() -> None:
    assert packing_unavailable(torch.device("cpu"), torch.float32) is None
    assert "CPU path" in str(packing_unavailable(torch.device("cuda"), torch.float32))
    assert "float16" in str(packing_unavailable(torch.device("cpu"), torch.float16))


def test_packed_generation_matches_peft_in_fp32(adapter: MakeAdapter, tmp_path: Path) -> None:
    placement = Placement(TEST_DEVICE, torch.float32)
    adapters = [None, adapter(1), adapter(2), adapter(3)]
    parity = run_parity(
        lambda: load_base_model("tiny", placement=placement), adapters, PROMPTS, 32, tmp_path, packed=True
    )
    assert_equal_up_to_near_ties(parity)  # the self-check's scoring runs on the plain weights: exact


def test_packed_weights_serve_generation_and_come_off_on_close() -> None:
    plain_model = load_base_model("tiny").model
    keys = set(plain_model.state_dict())
    with Engine(load_base_model("tiny"), EngineConfig(num_slots=2)) as plain:
        packed = Engine(load_base_model("tiny"), EngineConfig(num_slots=2, packed_linears=True))
        model = packed.model
        assert packed.packing.installed and not plain.packing.installed
        linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert linears and all(t in (PackedLinear, SlottedLoraLinear) for t in linears.values()), linears
        assert any(t is PackedLinear for t in linears.values())
        assert set(model.state_dict()) == keys  # same parameters under the same names

        ids = packed.tokenizer(PROMPTS[0])["input_ids"]
        got = [t.logprob for t in packed.prompt_logprobs(ids, None)]  # a generation pass: packed weights
        want = [t.logprob for t in plain.prompt_logprobs(ids, None)]
        assert got == pytest.approx(want, abs=1e-4)

        texts = list(PROMPTS)  # the task encoder's read: plain weights, bit for bit
        assert torch.equal(packed.hidden_state_reader()(texts), plain.hidden_state_reader()(texts))
        packed.close()
    assert not any(isinstance(m, (PackedLinear, SlottedLoraLinear)) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert set(model.state_dict()) == keys
    assert not packed.packing.installed


def test_a_tensor_that_needs_a_gradient_takes_the_plain_path() -> None:
    layer = nn.Linear(16, 8)
    holder = nn.Sequential(layer)
    packing = PackedWeights()
    packing.install(holder, batch_hint=4)
    packed_layer = holder[0]
    assert isinstance(packed_layer, PackedLinear) and packed_layer.weight is layer.weight
    x = torch.randn(3, 16, requires_grad=True)
    y = packed_layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert torch.allclose(packed_layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        with packing.exact():
            assert torch.equal(packed_layer(x), F.linear(x, layer.weight, layer.bias))
    packing.uninstall()
    assert holder[0] is layer


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_fused_projections_with_adapters_on_every_projection_match_peft(tmp_path: Path) -> None:
    """LoRA on q, k, v, gate and up applies to their slices of the fused GEMMs (and on o and down as before)."""
    settings = LoraSettings(target_modules=ALL_PROJECTIONS)
    adapters = [None, make_adapter(5, settings), make_adapter(6, settings)]
    parity = run_parity(
        lambda: load_base_model("tiny"), adapters, PROMPTS, 24, tmp_path, target_modules=ALL_PROJECTIONS, packed=True
    )
    assert_equal_up_to_near_ties(parity)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gemma2", "tiny-gemma3"])
def test_a_fused_mlp_computes_what_the_models_own_does(name: str) -> None:
    model = load_base_model(name).model
    original = model.get_submodule("model.layers.0.mlp")
    assert type(original).__name__ in GATED_MLPS
    packing = PackedWeights()
    packing.install(model, batch_hint=4)
    fused = model.get_submodule("model.layers.0.mlp")
    assert isinstance(fused, FusedGateUpMLP) and fused.gate_proj is original.gate_proj
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(x)  # gate and up on their plain weights (their packed copies gave way to the fused one)
        assert torch.allclose(fused(x), want, atol=1e-5, rtol=1e-5)
        with packing.exact():  # the parts one by one on the plain weights: the model's own ops
            assert torch.equal(fused(x), original(x))
    packing.uninstall()
    assert model.get_submodule("model.layers.0.mlp") is original


@pytest.mark.parametrize("bias", [False, True])
def test_a_fused_attention_computes_what_llamas_does(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, attention_bias=bias,
        num_hidden_layers=1, vocab_size=32,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    holder = nn.ModuleDict({"attn": LlamaAttention(config, layer_idx=0), "mlp": LlamaMLP(config)})
    original = holder["attn"]
    packing = PackedWeights()
    packing.install(holder, batch_hint=4)
    fused = holder["attn"]
    assert isinstance(fused, FusedQKVAttention) and isinstance(holder["mlp"], FusedGateUpMLP)
    x = torch.randn(2, 6, 64)
    positions = torch.arange(6).expand(2, -1)
    embeddings = LlamaRotaryEmbedding(config)(x, positions)
    rotated = []

    def counting(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated.append(1)
        return rotate_together(states, cos, sin)

    monkeypatch.setattr(packed_module, "rotate_together", counting)
    with torch.no_grad():
        got, _ = fused(x, embeddings)
        want, _ = original(x, embeddings)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert rotated == [1]  # no LoRA: queries and keys rotated as one tensor
        with packing.exact():
            assert torch.equal(fused(x, embeddings)[0], original(x, embeddings)[0])
    # the fused copy replaces the parts' own: packed memory is the Linears' size, not more
    assert packing.nbytes == sum(m.weight.numel() * 4 for m in holder.modules() if isinstance(m, nn.Linear))
    packing.uninstall()
    assert holder["attn"] is original and type(original.q_proj) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_and_keys_rotated_together_get_the_bits_they_get_apart(dtype: torch.dtype) -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(3, 5, 6 * 16, generator=generator).to(dtype)  # [B, T, (4 query + 2 key heads) * 16]
    positions = torch.arange(7, 12).expand(3, -1)
    cos, sin = LlamaRotaryEmbedding(config)(fused, positions)
    q, k = (t.view(3, 5, -1, 16).transpose(1, 2) for t in fused.split([64, 32], dim=-1))
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    both = rotate_together(fused.view(3, 5, -1, 16).transpose(1, 2), cos, sin)
    assert torch.equal(both[:, :4], want_q) and torch.equal(both[:, 4:], want_k)
