"""Group-wise quantisation of the shipped generator's matrices (``generator.quantize``)."""

from __future__ import annotations

import pytest
import torch

from generator.quantize import GROUP, dequantize, qmax, quantize


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_within_half_a_step_of_each_group(bits: int) -> None:
    values = torch.randn(37, 50, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.01, 3.0, 50)
    q = quantize(values, bits)
    back = dequantize(q, tuple(values.shape), bits)
    assert back.shape == values.shape and back.dtype == torch.float32
    flat = torch.zeros(q.scale.numel() * GROUP)
    flat[: values.numel()] = values.reshape(-1)
    step = q.scale.float().repeat_interleave(GROUP)[: values.numel()]
    error = (back.reshape(-1) - values.reshape(-1)).abs()
    assert bool((error <= step / 2 + 1e-6 + 1e-3 * values.reshape(-1).abs()).all())
    assert q.data.numel() == q.scale.numel() * GROUP * bits // 8  # int4: two values per byte
    # the largest value of each group is on the grid's edge, so it survives to fp16 precision
    top = flat.view(-1, GROUP).abs().amax(dim=1)
    assert torch.allclose(q.scale.float() * qmax(bits), top, rtol=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_zeros_stay_exact_and_signs_survive(bits: int) -> None:
    values = torch.zeros(3, 64)
    values[1] = torch.linspace(-1.0, 1.0, 64)
    back = dequantize(quantize(values, bits), (3, 64), bits)
    assert torch.equal(back[0], torch.zeros(64)) and torch.equal(back[2], torch.zeros(64))
    assert torch.equal(torch.sign(back[1][values[1].abs() > 0.2]), torch.sign(values[1][values[1].abs() > 0.2]))
    assert float(back[1, 0]) == pytest.approx(-1.0, abs=1e-3) and float(back[1, -1]) == pytest.approx(1.0, abs=1e-3)


def test_sizes_that_do_not_fit_are_refused() -> None:
    q = quantize(torch.randn(10, 64), 4)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize(q, (20, 64), 4)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize(q, (10, 64), 8)  # int4 bytes read as int8
    with pytest.raises(ValueError, match="unsupported"):
        quantize(torch.randn(4), 3)
