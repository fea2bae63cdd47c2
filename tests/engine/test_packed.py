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

from generator.base_model import load_base_model
from generator.device import Placement
from service.engine import Engine, EngineConfig
from service.engine.lora_layers import SlottedLoraLinear
from service.engine.packed import PackedLinear, PackedWeights, packing_unavailable
from tests.engine.conftest import PROMPTS, MakeAdapter
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
