from __future__ import annotations

import pytest
import torch

from generator.base_model import BaseModel
from generator.config import ConfigError, LoraSettings, LoraTrainingSettings
from generator.lora_layout import LayoutError, LoraLayout, NormStats
from generator.lora_model import LoraModel


def test_layout_of_tiny_model(tiny_base: BaseModel) -> None:
    layout = LoraLayout.from_model(tiny_base.model, LoraSettings(rank=4))
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(layout.segments) == 8
    first = layout.segments[0]
    assert first.key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert first.shape == (4, 64)
    v_b = layout.segments[3]
    assert v_b.key.endswith("layers.0.self_attn.v_proj.lora_B.weight") and v_b.shape == (32, 4)
    assert layout.dim == sum(layout.chunk_sizes) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert layout.segments[1].offset == layout.segments[0].end


def test_layout_keys_match_peft(tiny_base: BaseModel) -> None:
    lora = LoraModel(tiny_base.model, LoraSettings())
    assert sorted(lora.tensors()) == sorted(lora.layout.keys)


def test_flatten_unflatten_round_trip(tiny_base: BaseModel) -> None:
    layout = LoraLayout.from_model(tiny_base.model, LoraSettings(rank=2, target_modules=("q_proj", "k_proj", "o_proj")))
    vector = torch.randn(layout.dim)
    tensors = layout.unflatten(vector)
    assert torch.equal(layout.flatten(tensors), vector)
    tensors[layout.keys[0]].zero_()  # unflatten copies: the vector is untouched
    assert vector[: layout.segments[0].size].abs().sum() > 0


def test_flatten_errors(tiny_base: BaseModel) -> None:
    layout = LoraLayout.from_model(tiny_base.model, LoraSettings())
    tensors = layout.unflatten(torch.zeros(layout.dim))
    key = layout.keys[0]
    with pytest.raises(LayoutError, match="shape"):
        layout.flatten({**tensors, key: torch.zeros(3, 3)})
    missing = dict(tensors)
    del missing[key]
    with pytest.raises(LayoutError, match="missing LoRA tensor"):
        layout.flatten(missing)
    with pytest.raises(LayoutError, match="not in the layout"):
        layout.flatten({**tensors, "extra.weight": torch.zeros(1)})
    with pytest.raises(LayoutError, match="expected a vector"):
        layout.unflatten(torch.zeros(layout.dim + 1))


def test_unknown_target_module(tiny_base: BaseModel) -> None:
    with pytest.raises(LayoutError, match="not found"):
        LoraLayout.from_model(tiny_base.model, LoraSettings(target_modules=("nope_proj",)))


def test_norm_stats_round_trip_and_standardise(tiny_base: BaseModel) -> None:
    layout = LoraLayout.from_model(tiny_base.model, LoraSettings())
    scales = torch.rand(len(layout.segments)) * 10 + 0.1
    vectors = torch.randn(20, layout.dim) * scales[layout.segment_ids()] + 3.0
    stats = NormStats.fit(vectors, layout)
    normalised = stats.normalise(vectors)
    assert torch.allclose(stats.denormalise(normalised), vectors, atol=1e-4)
    assert torch.allclose(normalised.mean(0), torch.zeros(layout.dim), atol=1e-4)
    for segment in layout.segments:  # every segment has unit RMS after normalisation
        rms = normalised[:, segment.offset : segment.end].pow(2).mean().sqrt()
        assert abs(float(rms) - 1.0) < 1e-3
    # statistics come from the collection only: normalising a new vector does not depend on it
    new = torch.randn(layout.dim)
    assert torch.equal(stats.normalise(new), (new - stats.mean) / stats.scale[layout.segment_ids()])
    with pytest.raises(LayoutError):
        NormStats.fit(torch.zeros(3, layout.dim + 1), layout)


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ConfigError, match="distinct"):
        LoraSettings(target_modules=("q_proj", "q_proj"))
    with pytest.raises(ConfigError, match="do not fit"):
        LoraTrainingSettings(steps=10, checkpoints=5, checkpoint_every=5)
    assert LoraTrainingSettings(steps=40, checkpoints=3, checkpoint_every=4).checkpoint_steps() == [32, 36, 40]
    assert LoraSettings.from_dict(LoraSettings(rank=8).to_dict()) == LoraSettings(rank=8)
    with pytest.raises(ConfigError, match="unknown fields"):
        LoraSettings.from_dict({"rnk": 3})
