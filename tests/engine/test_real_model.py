"""The engine on the real SmolLM2-135M: a mixed batch equals plain peft, adapter by adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.lora_layout import LoraLayout
from service.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.slow


def test_mixed_batch_on_smollm2_matches_peft(tmp_path: Path) -> None:
    base = load_base_model("smollm2-135m")
    settings = LoraSettings()
    layout = LoraLayout.from_model(base.model, settings)
    adapters = [
        GeneratedAdapter(
            layout.unflatten(torch.randn(layout.dim, generator=torch.Generator().manual_seed(s)) * 0.1),
            settings,
            base.name,
            f"smol-{s}",
        )
        for s in range(3)
    ]
    chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Say hi.", "Count to five.")]
    texts = [base.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chat]
    prompts = [base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [(prompts[0], 0), (prompts[1], 1), (prompts[2], None), (prompts[2], 2)]

    engine = Engine(base, EngineConfig(num_slots=4))
    try:
        results = engine.generate_many(
            [p for p, _ in rows], [None if i is None else adapters[i] for _, i in rows], SamplingParams(max_tokens=12)
        )
    finally:
        engine.close()

    reference_model = load_base_model("smollm2-135m").model
    peft_model = PeftModel.from_pretrained(reference_model, adapters[0].save_peft(tmp_path / "a0"), adapter_name="a0")
    for i in (1, 2):
        peft_model.load_adapter(adapters[i].save_peft(tmp_path / f"a{i}"), adapter_name=f"a{i}")
    peft_model.eval()
    for (ids, index), result in zip(rows, results, strict=True):
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            if index is None:
                with peft_model.disable_adapter():
                    out = peft_model.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False)
            else:
                peft_model.set_adapter(f"a{index}")
                out = peft_model.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False)
        assert result.token_ids == out[0, len(ids) :].tolist()
    assert len({tuple(r.token_ids) for r in results}) >= 3
