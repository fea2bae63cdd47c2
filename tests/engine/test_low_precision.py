"""Engine parity with plain peft in fp32 (exact) and in bf16 on the CPU (the tiny model; torch runs bf16 on the CPU).

Fixed prompt set: the 4 engine test prompts x (no adapter, 3 adapters), 32 greedy tokens each (through EOS).
Measured on the development CPU (AMD EPYC, AVX2, torch 2.13.0, 1 and 2 threads): fp32 and bf16 100% equal alone and
in one mixed batch (bf16 mixed was 92.8% before the engine kept its KV rows in place and prefilled in chunks: two rows
of the random tiny model flipped a near tie; plain peft's own mixed batch equals peft alone on 100% here). Answer
log-likelihoods (the logits at every answer position, averaged per token): engine == peft in the same dtype
(measured difference 0.0; tolerance 1e-3 nats/token), bf16 within 0.05 of fp32 (measured at most 0.028).

On a CPU with native bf16 a mixed batch used to round differently from one request at a time: alone 100%, mixed
92.8% of positions (an Intel Xeon with AMX-BF16, and again on an AMD EPYC with AVX-512 BF16). Each of the 3 rows that
left peft's tokens did so at a near tie in peft's own logits (a gap of 0.016 to 0.031 logits, 1 bf16 ulp, where the
median gap between the two best tokens is 0.25 to 0.56), and the random tiny model then continued differently. The
cause was the decode step's attention over left-padded rows: SDPA's CPU kernel sums a row's keys in vector lanes,
and padding moves them to other lanes (plain HF's own padded batch of 16 left its unpadded tokens on 4 of 512
positions there). Since the engine's decode steps in bf16 / fp16 attend each row alone (``attention.py``), the mixed
batch is at 100% on that EPYC too (not measured on the Xeon since). The test holds both to the issue's 95% and
requires every divergence, alone or mixed, to start at a near tie (``BF16_NEAR_TIE`` of ``parity.py``): a real
indexing or adapter bug changes tokens at clear margins.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generator.base_model import load_base_model
from generator.device import Placement
from tests.engine.conftest import PROMPTS, MakeAdapter
from tests.engine.parity import BF16_MIXED_FLOOR, BF16_NEAR_TIE, TEST_DEVICE, Parity, run_parity

TOKENS = 32


def _parity(dtype: torch.dtype, adapter: MakeAdapter, folder: Path) -> Parity:
    placement = Placement(TEST_DEVICE, dtype)
    adapters = [None, adapter(1), adapter(2), adapter(3)]
    return run_parity(lambda: load_base_model("tiny", placement=placement), adapters, PROMPTS, TOKENS, folder)


def test_fp32_is_exact(adapter: MakeAdapter, tmp_path: Path) -> None:
    parity = _parity(torch.float32, adapter, tmp_path)
    assert parity.alone == parity.reference
    assert parity.mixed == parity.reference
    assert torch.allclose(parity.engine_scores, parity.reference_scores, atol=1e-5)


def test_bf16_on_cpu_matches_peft_in_bf16(adapter: MakeAdapter, tmp_path: Path) -> None:
    parity = _parity(torch.bfloat16, adapter, tmp_path / "bf16")
    assert Parity.agreement(parity.alone, parity.reference) >= 0.95
    assert Parity.agreement(parity.mixed, parity.reference) >= BF16_MIXED_FLOOR
    # where a row leaves peft's tokens, it starts at a near tie in peft's own logits (bf16 rounding), not a bug
    assert all(
        gap <= BF16_NEAR_TIE for gap in parity.first_divergences(parity.alone) + parity.first_divergences(parity.mixed)
    )
    assert all(a[:4] == r[:4] for a, r in zip(parity.mixed, parity.reference, strict=True))  # no early divergence
    assert (parity.engine_scores - parity.reference_scores).abs().max() <= 1e-3
    fp32 = _parity(torch.float32, adapter, tmp_path / "fp32")
    assert (parity.engine_scores - fp32.reference_scores).abs().max() <= 0.05
    assert not torch.equal(parity.engine_scores, fp32.engine_scores)  # it really ran in bf16
