"""A long prompt's chunks ride in decode steps' forward passes (``service/engine/fused.py``): the same greedy tokens
as plain peft for the streams and the long prompts, with adapters on both sides, and the passes really were fused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from generator.base_model import load_base_model, tiny_architecture_config
from generator.device import Placement
from service.engine import Engine, SamplingParams
from service.engine.fused import chunk_attention, chunk_mask, fused_passes_unavailable
from service.engine.scheduler import Scheduler
from tests.engine.conftest import PROMPTS, MakeAdapter, Reference
from tests.engine.parity import (
    BF16_MIXED_FLOOR,
    BF16_NEAR_TIE,
    Parity,
    architecture_adapters,
    assert_equal_up_to_near_ties,
    run_parity,
)


@pytest.fixture
def fused_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts fused passes of every engine the test builds."""
    calls: list[int] = []
    original = Scheduler._fused_step

    def counted(self: Scheduler) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(Scheduler, "_fused_step", counted)
    return calls


def test_fused_chunks_match_peft_with_adapters_on_both_sides(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    engine = make_engine(num_slots=4, prefill_chunk=3, fused_passes=True)
    long_prompt = [t for ids in prompt_ids for t in ids]
    # short prompts decode (in groups, padded) while the long ones are read 3 tokens at a time beside them
    prompts = [prompt_ids[2], prompt_ids[0], long_prompt, prompt_ids[3], long_prompt[5:], prompt_ids[1]]
    adapters = [adapter(1), None, adapter(2), adapter(3), None, adapter(2)]
    results = engine.generate_many(prompts, adapters, SamplingParams(max_tokens=12, ignore_eos=True))
    for ids, a, result in zip(prompts, adapters, results, strict=True):
        assert result.token_ids == reference(ids, a, 12)
    assert engine.stats().fused_chunks_total >= 2 * (len(long_prompt) // 3) - 2  # nearly every chunk was fused


def test_a_stream_alone_beside_a_long_prompt(
    make_engine: Callable[..., Engine], adapter: MakeAdapter, reference: Reference, prompt_ids: list[list[int]]
) -> None:
    """One running row and a long prompt that joins it at the end: the join after a fused pass keeps both right."""
    engine = make_engine(num_slots=2, prefill_chunk=4, fused_passes=True)
    running = engine.submit(prompt_ids[2], adapter=adapter(1), params=SamplingParams(max_tokens=40, ignore_eos=True))
    stream = iter(running)
    next(stream)
    long_prompt = [t for _ in range(2) for ids in prompt_ids for t in ids]
    late = engine.submit(long_prompt, params=SamplingParams(max_tokens=6, ignore_eos=True))
    assert late.result().token_ids == reference(long_prompt, None, 6)
    list(stream)
    assert running.result().token_ids == reference(prompt_ids[2], adapter(1), 40)
    assert engine.stats().fused_chunks_total > 0


def test_chunk_mask_is_causal_over_the_prefix() -> None:
    assert chunk_mask(0, 3, torch.device("cpu")) is None  # a first chunk: SDPA's own causal path
    mask = chunk_mask(2, 3, torch.device("cpu"))
    assert mask is not None and mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]


@pytest.mark.parametrize("done", [0, 5])
@pytest.mark.parametrize("groups", [1, 3])
def test_chunk_attention_on_key_value_heads_equals_transformers_sdpa(done: int, groups: int) -> None:
    """The chunk's attention skips transformers' copy of the keys per query head: same outputs."""
    generator = torch.Generator().manual_seed(done + groups)
    kv_heads, tokens, dim = 2, 4, 8
    module = torch.nn.Module()
    module.num_key_value_groups = groups  # type: ignore[assignment]
    module.is_causal = True  # type: ignore[assignment]
    query = torch.randn(1, kv_heads * groups, tokens, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, done + tokens, dim, generator=generator) for _ in range(2))
    mask = chunk_mask(done, tokens, torch.device("cpu"))
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got = chunk_attention(query, key, value, mask, 0.3)
    assert got.shape == want.shape == (1, tokens, kv_heads * groups, dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "why"), [("gemma2", "attention"), ("mistral", "sliding-window"), ("gemma3", "sliding-window")]
)
def test_fusion_stays_off_where_its_masks_would_be_wrong(architecture: str, why: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_architecture_config(architecture, 256)
    if architecture == "mistral":
        config.sliding_window = 16
    model = AutoModelForCausalLM.from_config(config)
    reason = fused_passes_unavailable(model, torch.device("cpu"))
    assert reason is not None and why in reason
    assert "CPU" in (fused_passes_unavailable(load_base_model("tiny").model, torch.device("cuda")) or "")
    assert fused_passes_unavailable(load_base_model("tiny").model, torch.device("cpu")) is None


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "phi3"])
def test_fused_chunks_match_peft_on_each_architecture(
    architecture: str, tmp_path: Path, fused_steps: list[int]
) -> None:
    """Alone (chunks read with nothing decoding: apart) and in one mixed batch (the long prompts' chunks fused into
    the short ones' decode steps), each prompt with no adapter and two adapters."""
    name = "tiny" if architecture == "llama" else f"tiny-{architecture}"
    settings, adapters = architecture_adapters(architecture, load_base_model(name))
    parity = run_parity(
        lambda: load_base_model(name), adapters, PROMPTS, 12, tmp_path, settings.target_modules, prefill_chunk=4,
        fused=True,
    )  # fmt: skip
    assert fused_steps  # the mixed batch's long prompts were read in decode steps' passes
    assert parity.alone == parity.reference
    assert parity.mixed == parity.reference


def test_fused_chunks_on_the_services_cpu_path(adapter: MakeAdapter, tmp_path: Path, fused_steps: list[int]) -> None:
    """With packed Linears and the matmul decode attention too (the service's CPU path): equal to plain peft except
    at near ties, like those two alone."""
    adapters = [None, adapter(1), adapter(2), adapter(3)]
    parity = run_parity(
        lambda: load_base_model("tiny"), adapters, PROMPTS, 32, tmp_path, packed=True, decode_attention=True,
        prefill_chunk=4, fused=True,
    )  # fmt: skip
    assert fused_steps
    assert_equal_up_to_near_ties(parity)


def test_fused_chunks_in_bf16_match_peft_in_bf16(adapter: MakeAdapter, tmp_path: Path, fused_steps: list[int]) -> None:
    """bf16 on the CPU, held to what the engine's other bf16 paths are (``test_low_precision.py``): tokens equal to
    peft's in the same dtype on >= 95% of positions alone, the mixed batch's floor, divergences only at near ties."""
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    adapters = [None, adapter(1), adapter(2), adapter(3)]
    parity = run_parity(
        lambda: load_base_model("tiny", placement=placement), adapters, PROMPTS, 32, tmp_path, prefill_chunk=4,
        fused=True,
    )  # fmt: skip
    assert fused_steps
    assert Parity.agreement(parity.alone, parity.reference) >= 0.95
    assert Parity.agreement(parity.mixed, parity.reference) >= BF16_MIXED_FLOOR
    gaps = parity.first_divergences(parity.alone) + parity.first_divergences(parity.mixed)
    assert all(gap <= BF16_NEAR_TIE for gap in gaps), gaps
