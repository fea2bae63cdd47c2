"""Adapters trained with the end-of-sequence token after each answer: a completion is the label, then "stop"."""

from __future__ import annotations

from pathlib import Path

from generator.base_model import load_base_model
from generator.checkpoint import load_checkpoint
from generator.generate import AdapterGenerator
from generator.task_encoder import TaskEncoder
from generator.tasks import format_prompt
from generator.training.pipeline import Run
from service.engine import Engine, EngineConfig


def test_generated_label_completions_stop_after_the_label(small_run: Path) -> None:
    run = Run.open(small_run)
    assert run.settings.lora_training.end_token
    seen, _ = run.tasks()
    base = load_base_model("tiny")
    checkpoint = load_checkpoint(small_run / "generator")
    generator = AdapterGenerator(checkpoint, TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder))
    adapters = [generator.generate(task.spec(8)) for task in seen]
    with Engine(base, EngineConfig(num_slots=4, max_rank=4)) as engine:
        stopped = 0
        total = 0
        for task, adapter in zip(seen, adapters, strict=True):
            labels = set(task.metadata["labels"])
            for example in task.test[:4]:
                bos = [base.tokenizer.bos_token_id]
                ids = bos + base.tokenizer(format_prompt(example.input), add_special_tokens=False)["input_ids"]
                result = engine.generate(ids, adapter=adapter, max_tokens=8)
                total += 1
                if result.finish_reason == "stop" and result.text.strip() in labels:
                    stopped += 1
    # the LoRAs the generator learned from end every answer with EOS; its adapters do too, nearly always
    assert stopped >= 0.9 * total, f"{stopped} of {total} completions were one label followed by stop"
