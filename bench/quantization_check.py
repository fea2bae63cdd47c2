"""How far a quantised shipping form moves the adapters: for each held-out task of a run, the relative norm of the
change in every LoRA weight update B·A (all layers together) between the fp16 form and the int8 / int4 forms, and
their cosine.

    python bench/quantization_check.py --run runs/e2e-int4 --generator bench/results/e2e-contrast/generator

``--generator``: a generator folder (training or packed form); each form is written from it to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.base_model import load_base_model
from generator.checkpoint import load_checkpoint, save_checkpoint
from generator.generate import AdapterGenerator
from generator.task_encoder import TaskEncoder
from generator.tasks import load_bigbench_task

DATA = Path(os.environ.get("ICM_LORA_DATA_DIR", Path.home() / ".cache" / "icm-lora"))
ROOT = DATA / "bigbench" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"


def weight_update(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (tensors[key.replace("lora_A", "lora_B")].double() @ a.double()).reshape(-1)
            for key, a in tensors.items()
            if "lora_A" in key
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--generator", type=Path, required=True)
    args = parser.parse_args()
    run = json.loads((args.run / "run.json").read_text(encoding="utf-8"))
    base = load_base_model("smollm2-135m")
    source = load_checkpoint(args.generator)
    generators = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("float16", "int8", "int4"):
            save_checkpoint(source, Path(tmp) / weights, packed=True, weights=weights)
            checkpoint = load_checkpoint(Path(tmp) / weights)
            encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
            generators[weights] = AdapterGenerator(checkpoint, encoder)
    reference = generators["float16"]
    found: dict[str, list[tuple[float, float]]] = {"int8": [], "int4": []}
    for name in run["unseen"]:
        task = load_bigbench_task(ROOT / name / "task.json", name=name, max_test=40, max_examples=2000)
        vector = reference.encoder.encode(task.spec(8))
        want = weight_update(reference.checkpoint.layout.unflatten(reference.decode_vector(vector)))
        for weights in found:
            gen = generators[weights]
            got = weight_update(gen.checkpoint.layout.unflatten(gen.decode_vector(vector)))
            cosine = float(torch.nn.functional.cosine_similarity(want, got, dim=0))
            found[weights].append((float((got - want).norm() / want.norm()), cosine))
    for weights, values in found.items():
        rel = [r for r, _ in values]
        print(
            f"{weights}: relative change of B·A median {statistics.median(rel):.4f}, max {max(rel):.4f}; "
            f"cosine min {min(c for _, c in values):.5f} ({len(values)} tasks)"
        )


if __name__ == "__main__":
    main()
