"""The engine on the supported architectures: tiny random models built from their transformers config classes.

Llama (SmolLM2), Qwen2 (biased q/k/v projections), Mistral, Gemma 2 (eager attention with soft-capping: the decode
step's padding mask must be additive there), Gemma 3 and Phi-3 (fused ``qkv_proj``: the LoRA targets differ). Greedy
tokens equal plain peft's, alone and in one mixed batch; answer log-likelihoods too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator.base_model import TINY_ARCHITECTURES, load_base_model
from generator.config import LoraSettings
from generator.device import Placement
from generator.lora_layout import LayoutError, LoraLayout
from service.engine import Engine
from tests.engine.conftest import PROMPTS
from tests.engine.parity import TEST_DEVICE, architecture_adapters, run_parity


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_engine_matches_peft(architecture: str, tmp_path: Path) -> None:
    name = f"tiny-{architecture}"
    placement = Placement(TEST_DEVICE, torch.float32)
    settings, adapters = architecture_adapters(architecture, load_base_model(name, placement=placement))
    parity = run_parity(
        lambda: load_base_model(name, placement=placement), adapters, PROMPTS, 12, tmp_path, settings.target_modules
    )
    assert parity.alone == parity.reference
    assert parity.mixed == parity.reference
    assert torch.allclose(parity.engine_scores, parity.reference_scores, atol=1e-5)
    n = len(PROMPTS)
    assert parity.reference[:n] != parity.reference[n : 2 * n]  # the adapters change the output


def test_phi3_needs_its_fused_targets() -> None:
    base = load_base_model("tiny-phi3")
    with pytest.raises(LayoutError, match=r"qkv_proj \(Phi-3\)"):
        LoraLayout.from_model(base.model, LoraSettings())
    with pytest.raises(ValueError, match=r"set lora.target_modules to \[\"qkv_proj\"\]"):
        Engine(base)
