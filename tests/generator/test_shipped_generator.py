"""The packaged default generator for SmolLM2-135M: it loads, matches the real base model, and its adapters are valid
PEFT adapters that change the model's answers in the direction of the task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from generator.base_model import load_base_model
from generator.checkpoint import load_checkpoint
from generator.generate import AdapterGenerator
from generator.task_encoder import TaskEncoder
from generator.tasks import Example, TaskSpec
from service.config import PACKAGED_GENERATORS, Settings

pytestmark = pytest.mark.slow

SHIPPED = PACKAGED_GENERATORS / "smollm2-135m"
SENTIMENT = TaskSpec(
    "Classify the sentiment of a hotel review sentence as positive, negative, neutral or ambivalent.",
    (
        Example("The staff were friendly and the room was spotless.", "positive"),
        Example("The bathroom was dirty and nobody cared.", "negative"),
        Example("The hotel is near the station.", "neutral"),
        Example("Great breakfast, but the bed was awful.", "ambivalent"),
    ),
)


def test_serve_finds_the_shipped_generator_without_configuration() -> None:
    assert (SHIPPED / "generator.json").is_file() and (SHIPPED / "generator.safetensors").is_file()
    assert Settings(generator_path=None).resolved_generator_path() == SHIPPED
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 50_000_000


def test_shipped_generator_makes_a_valid_adapter_for_the_real_model(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(SHIPPED)
    assert checkpoint.base_model == "smollm2-135m"
    base = load_base_model("smollm2-135m")
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
    generator = AdapterGenerator(checkpoint, encoder)
    adapter = generator.generate(SENTIMENT)
    assert adapter.num_parameters == checkpoint.layout.dim
    assert all(torch.isfinite(t).all() for t in adapter.tensors.values())
    assert generator.generate(SENTIMENT).sha256 == adapter.sha256  # deterministic
    assert generator.generate(TaskSpec("Answer arithmetic questions with a number.")).sha256 != adapter.sha256

    adapter.save_peft(tmp_path)
    ids = base.tokenizer("Input: The room was filthy and cold.\nOutput:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base.model(ids).logits[0, -1]
        tuned = PeftModel.from_pretrained(base.model, str(tmp_path))
        after = tuned(ids).logits[0, -1]
    assert not torch.allclose(before, after, atol=1e-3)
    labels = [base.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")]
    top = int(torch.argmax(after))
    assert top in labels, f"expected a label token, got {base.tokenizer.decode([top])!r}"
