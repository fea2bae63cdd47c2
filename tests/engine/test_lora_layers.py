"""Slotted LoRA layers: per-row deltas equal peft, rank padding is exact, bad adapters are refused with the reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.lora_layout import LoraLayout
from service.engine import AdapterError, Engine, EngineConfig, LoraBank, SlottedLoraLinear
from service.engine.lora_layers import NO_SLOT
from tests.engine.conftest import MakeAdapter


def _peft_logits(adapter: GeneratedAdapter, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base_model("tiny").model, adapter.save_peft(tmp_path / adapter.adapter_id))
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _bank_logits(model: torch.nn.Module, bank: LoraBank, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
    bank.activate(slots)
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_install_keeps_parameters_and_names(adapter: MakeAdapter) -> None:
    base = load_base_model("tiny")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    bank = LoraBank(base.model, num_slots=3, max_rank=4, target_modules=("q_proj", "v_proj"))
    assert len(bank.layers) == 2 * base.num_layers
    assert all(isinstance(m, SlottedLoraLinear) for m in bank.layers)
    after = base.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the layout used by the generator still reads the wrapped model
    assert (
        LoraLayout.from_model(base.model, LoraSettings()).dim
        == LoraLayout.from_model(load_base_model("tiny").model, LoraSettings()).dim
    )
    with pytest.raises(ValueError, match="one engine per model"):
        LoraBank(base.model, num_slots=1, max_rank=4, target_modules=("q_proj",))
    bank.uninstall()
    assert not any(isinstance(m, SlottedLoraLinear) for m in base.model.modules())


def test_each_row_gets_its_own_slot_and_matches_peft(adapter: MakeAdapter, tmp_path: Path) -> None:
    a, b = adapter(1), adapter(2)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 7, 8, 300, 12, 1]])
    base = load_base_model("tiny")
    with torch.inference_mode():
        plain = base.model(input_ids=ids).logits
    bank = LoraBank(base.model, num_slots=2, max_rank=4, target_modules=("q_proj", "v_proj"))
    bank.load(0, bank.prepare(a))
    bank.load(1, bank.prepare(b))
    mixed = _bank_logits(base.model, bank, [1, NO_SLOT], ids)
    torch.testing.assert_close(mixed[0], _peft_logits(b, ids, tmp_path)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed[1], plain[1])  # no adapter: exactly the base model
    swapped = _bank_logits(base.model, bank, [0, 1], ids)
    torch.testing.assert_close(swapped[0], _peft_logits(a, ids, tmp_path)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped[1], _peft_logits(b, ids, tmp_path)[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped[0], plain[0], atol=1e-3)  # the adapters do something
    bank.activate(None)
    with torch.inference_mode():
        assert torch.equal(base.model(input_ids=ids).logits, plain)


def test_smaller_rank_is_zero_padded_exactly(adapter: MakeAdapter, tmp_path: Path) -> None:
    small = adapter(3, LoraSettings(rank=2, alpha=6.0))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    base = load_base_model("tiny")
    bank = LoraBank(base.model, num_slots=2, max_rank=8, target_modules=("q_proj", "v_proj"))
    bank.load(1, bank.prepare(adapter(9)))  # leave other weights in the slot first: padding must clear them
    bank.load(1, bank.prepare(small))
    assert torch.count_nonzero(bank.layers[0].lora_A[1, 2:]) == 0
    assert torch.count_nonzero(bank.layers[0].lora_B[1, :, 2:]) == 0
    assert bank.scales[1].item() == pytest.approx(3.0)
    got = _bank_logits(base.model, bank, [1], ids)
    # the padded terms are exact zeros; what remains is float rounding of a different matmul shape
    torch.testing.assert_close(got, _peft_logits(small, ids, tmp_path), rtol=1e-5, atol=1e-5)


def test_adapter_on_a_subset_of_the_targets_is_served(adapter: MakeAdapter, tmp_path: Path) -> None:
    q_only = adapter(4, LoraSettings(target_modules=("q_proj",)))
    ids = torch.tensor([[5, 17, 42, 99]])
    base = load_base_model("tiny")
    bank = LoraBank(base.model, num_slots=1, max_rank=4, target_modules=("q_proj", "v_proj"))
    bank.load(0, bank.prepare(adapter(5)))
    bank.load(0, bank.prepare(q_only))  # v_proj of the slot must be zeroed
    got = _bank_logits(base.model, bank, [0], ids)
    torch.testing.assert_close(got, _peft_logits(q_only, ids, tmp_path), rtol=1e-5, atol=1e-5)


def _with_tensors(adapter: GeneratedAdapter, tensors: dict[str, torch.Tensor]) -> GeneratedAdapter:
    return dataclasses.replace(adapter, tensors=tensors)


def test_bad_adapters_are_refused_with_the_reason(adapter: MakeAdapter) -> None:
    engine = Engine(load_base_model("tiny"), EngineConfig(num_slots=2, max_rank=4))
    try:
        good = adapter(6)
        key_a = next(k for k in good.tensors if k.endswith("q_proj.lora_A.weight"))
        cases = {
            "rank 8": adapter(7, LoraSettings(rank=8, alpha=16.0)),
            "k_proj": adapter(8, LoraSettings(target_modules=("q_proj", "k_proj"))),
            "shape": _with_tensors(good, {**good.tensors, key_a: good.tensors[key_a].t().contiguous()}),
            "lacks": _with_tensors(good, {k: v for k, v in good.tensors.items() if k != key_a}),
            "no place": _with_tensors(good, {**good.tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4)}),
            "NaN": _with_tensors(good, {**good.tensors, key_a: torch.full_like(good.tensors[key_a], float("nan"))}),
            "base model": dataclasses.replace(good, base_model="smollm2-135m"),
        }
        for reason, bad in cases.items():
            with pytest.raises(AdapterError, match=reason):
                engine.submit([5, 6, 7], adapter=bad)
            with pytest.raises(AdapterError, match=reason):
                engine.load_adapter(bad)
        assert engine.stats(sync=True).swaps_total == 0 and engine.resident_adapters() == {}
        assert engine.generate([5, 6, 7], adapter=good, max_tokens=2).completion_tokens == 2
    finally:
        engine.close()


def test_activations_taking_turns_keep_their_gathered_rows_until_a_slot_changes(
    adapter: MakeAdapter, tmp_path: Path
) -> None:
    """Decode groups activate their rows in turn every step: each activation keeps the A/B rows its layers gathered
    (no gather again), and loading a slot drops them all, so a swapped adapter is never served from stale rows."""
    a, b, c = adapter(1), adapter(2), adapter(3)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 7, 8, 300, 12, 1]])
    base = load_base_model("tiny")
    bank = LoraBank(base.model, num_slots=2, max_rank=4, target_modules=("q_proj", "v_proj"))
    bank.load(0, bank.prepare(a))
    bank.load(1, bank.prepare(b))
    first = _bank_logits(base.model, bank, [0, 1], ids)
    gathered = bank._rows.gathered
    assert len(gathered) == len(bank.layers)  # every layer gathered its rows once
    other = _bank_logits(base.model, bank, [1, 0], ids)
    assert bank._rows.gathered is not gathered
    again = _bank_logits(base.model, bank, [0, 1], ids)
    assert bank._rows.gathered is gathered and torch.equal(again, first)  # the same rows, not gathered again
    torch.testing.assert_close(other[0], _peft_logits(b, ids, tmp_path)[0], rtol=1e-5, atol=1e-5)
    bank.load(0, bank.prepare(c))  # slot 0 now holds another adapter
    swapped = _bank_logits(base.model, bank, [0, 1], ids)
    assert bank._rows.gathered is not gathered
    torch.testing.assert_close(swapped[0], _peft_logits(c, ids, tmp_path)[0], rtol=1e-5, atol=1e-5)
