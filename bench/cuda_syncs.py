"""Host syncs inside the engine's decode step on a real GPU (bench/gpu.sh): CUDA's own sync detector.

    python bench/cuda_syncs.py [--base-model tiny] [--out bench/results/syncs-cuda.json]

Runs a mixed batch (adapters and none, greedy and sampled rows, rows leaving at different steps) with
``torch.cuda.set_sync_debug_mode("warn")`` switched on inside each decode step only, and counts the synchronising
operations CUDA reports per step. Target: 1 (the sampled tokens' transfer). On the CPU the same property is tested by
``tests/engine/test_host_sync.py`` with patched tensor methods.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.device import resolve_placement
from generator.lora_layout import LoraLayout
from service.engine import Engine, EngineConfig, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "syncs-cuda.json")
    args = parser.parse_args()
    placement = resolve_placement("cuda", args.dtype)
    base = load_base_model(args.base_model, placement=placement)
    settings = LoraSettings()
    layout = LoraLayout.from_model(base.model, settings)
    adapters = [
        GeneratedAdapter(
            layout.unflatten(torch.randn(layout.dim, generator=torch.Generator().manual_seed(s)) * 0.1),
            settings,
            base.name,
            f"sync-{s}",
        )
        for s in range(2)
    ]
    prompts = ["Input: cat Output:", "hello world, the answer is", "a", "Task: reverse the words. Input: a b Output:"]
    params = [
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=6, ignore_eos=True),
    ]
    per_step: list[list[str]] = []
    with Engine(base, EngineConfig(num_slots=2)) as engine:
        scheduler = engine._scheduler
        step = scheduler._decode_step

        def watched_step() -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            per_step.append([str(w.message).splitlines()[0][:160] for w in caught])

        scheduler._decode_step = watched_step  # type: ignore[method-assign]
        engine.generate_many([engine.encode(p) for p in prompts], [adapters[0], None, adapters[1], adapters[0]], params)
        engine.stats(sync=True)
    counts = [len(w) for w in per_step]
    result = {
        "placement": str(placement),
        "gpu": torch.cuda.get_device_name(placement.device),
        "steps": len(per_step),
        "syncs_per_step": counts,
        "target": "1 per step (the sampled tokens)",
        "met": bool(per_step) and all(n == 1 for n in counts),
        "messages": sorted({m for w in per_step for m in w}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
