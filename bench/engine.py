"""Serving-engine benchmark on SmolLM2-135M: hot swap, mixed-adapter throughput, against plain HF and peft.

    python bench/engine.py                                   # about 5-6 minutes on a 2-core CPU
    python bench/engine.py --pairs 2 --tokens 8 --seq-requests 2 --swaps 200 --out /tmp/engine.json   # a quick look
    python bench/engine.py --device cuda --dtype bfloat16   # on a GPU (bench/gpu.sh)
    python bench/engine.py --packed-linears                  # the engine as the service runs it on a CPU

Prints the figures and writes ``bench/results/engine-<device>-<dtype>.json`` (``-packed`` added with
``--packed-linears``, which makes the engine generate on oneDNN-packed weights; ``--out`` to change it; the CPU fp32
figures measured before device settings existed are in ``bench/results/engine.json``). ``--device`` / ``--dtype``
take the service's values (``auto`` by default: CUDA + bf16 when a GPU is present, else CPU + fp32). On CUDA the
engine's slot copies are timed by CUDA events, HF/peft runs end with a device synchronisation, and the targets are
the issue's GPU targets (16 adapters >= 0.9x no adapter, a hot swap including preparation <= 0.2 ms).

Two throughputs per run, with the same prompts, the same number of new tokens (EOS ignored) and greedy decoding on
every side:

* end to end: generated tokens / wall-clock seconds of the whole request set (prefill included);
* decode: rows / median duration of one decode step (the engine's steps are timed by an observer, HF's and peft's by a
  stopping criterion that is called once per step). The median step shrugs off the stalls that a shared machine adds.

Each ratio compares contenders run back to back, ``--pairs`` times with their order rotated, and keeps the median of
the per-repetition ratios, so that slow phases of the machine hit both sides of a ratio alike.

Measured:
* hot swap: the in-place copy of a default adapter (rank 4, q_proj + v_proj, 30 layers) into a slot (p50, p95), and
  the ``Engine.load_adapter`` call around it (hand-off to the engine thread) for a ``GeneratedAdapter`` the engine has
  prepared before (the service's steady state: an adapter is prepared once per id) and for one it has never seen
  (validation + layout as a slot row + copy: the first request of a new adapter);
* memory: resident set size growth over ``--swaps`` swaps of distinct adapters through the slots;
* the engine with 16 different adapters (resident, or all swapped in during the run) vs the same engine, same
  requests, no adapter;
* plain peft: one ``PeftModel`` switching adapters per request (``set_adapter``, sequential, batch 1) and peft's
  mixed-batch generation (``generate(adapter_names=[...])``);
* batch 1, 4, 16: engine without adapter vs HF ``generate``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.device import resolve_placement, synchronize
from generator.lora_layout import LoraLayout
from service.engine import Engine, EngineConfig, EngineObserver, PreparedAdapter, SamplingParams

TOPICS = ["the sea", "a red fox", "winter", "bread", "the moon", "trains", "a garden", "rain"]
TARGETS = {  # name -> (comparison, bound, what it is measured on)
    "swap_p50_ms": ("<=", 2.0, "in-place copy into a slot"),
    "mixed16_vs_none16": (">=", 0.85, "decode throughput, paired"),
    "engine_vs_peft_sequential": (">=", 5.0, "end-to-end throughput, paired"),
    "engine_vs_peft_mixed_batch": (">=", 1.5, "end-to-end throughput, paired"),
    "rss_growth_mb_per_1000_swaps": ("<", 50.0, "VmRSS after - before"),
    "swap_with_prepare_p50_ms": (
        "<=",
        0.5,
        "Engine.load_adapter(GeneratedAdapter) of a resident-or-known id: prepared once, then copy + hand-off",
    ),
}
CUDA_TARGETS = {  # issue 13's targets on a GPU
    "mixed16_vs_none16": (">=", 0.9, "decode throughput, paired"),
    "swap_with_prepare_p50_ms": ("<=", 0.2, "Engine.load_adapter of a GeneratedAdapter: check, layout, copy"),
}


class EngineClock(EngineObserver):
    """Swap durations and the end time of every decode step."""

    def __init__(self) -> None:
        self.swaps: list[float] = []
        self.steps: list[float] = []

    def on_swap(self, adapter_id: str, slot: int, seconds: float, evicted: str | None) -> None:
        self.swaps.append(seconds)

    def on_batch(self, size: int) -> None:
        self.steps.append(time.perf_counter())


class StepClock(StoppingCriteria):
    """Called by ``generate`` once per generated token: stamps the end of each step, never stops anything."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


@dataclass
class Run:
    end_to_end: float  # tokens / s
    decode: float  # rows / median step seconds


def median_step(stamps: Sequence[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompts(n: int) -> list[str]:
    """Short prompts of different lengths (about 8 to 20 tokens)."""
    return [f"Write {1 + i % 3} short lines about {TOPICS[i % len(TOPICS)]}" + " please" * (i % 5) for i in range(n)]


def make_adapters(model: torch.nn.Module, n: int, name: str, first: int = 0) -> list[GeneratedAdapter]:
    settings = LoraSettings()
    layout = LoraLayout.from_model(model, settings)
    out = []
    for i in range(first, first + n):
        vector = torch.randn(layout.dim, generator=torch.Generator().manual_seed(i)) * 0.05
        out.append(GeneratedAdapter(layout.unflatten(vector), settings, name, f"bench-{i}"))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests (= distinct adapters)")
    parser.add_argument("--pairs", type=int, default=6, help="back-to-back repetitions per comparison (median kept)")
    parser.add_argument("--seq-requests", type=int, default=8, help="requests timed for sequential peft")
    parser.add_argument("--swaps", type=int, default=1000, help="swaps for the memory check")
    parser.add_argument("--swap-samples", type=int, default=300, help="timed swaps for the latency percentiles")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes for the no-adapter comparison with HF")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--base-model", default="smollm2-135m", help="smollm2-135m, or tiny for a check of the script")
    parser.add_argument(
        "--packed-linears", action="store_true", help="the engine generates on packed weights (the service's default)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/engine-<device>-<dtype>.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    placement = resolve_placement(args.device, args.dtype)
    device = placement.device
    name = f"engine-{placement.name}" + ("-packed" if args.packed_linears else "")
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"{name}.json"
    started, load_at_start = time.perf_counter(), os.getloadavg()
    n_req = args.requests

    def load() -> torch.nn.Module:
        return load_base_model(args.base_model, placement=placement).model

    base = load_base_model(args.base_model, placement=placement)
    tokenizer = base.tokenizer
    texts = prompts(max(n_req, *batches))
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    adapters = make_adapters(base.model, max(3 * n_req, 50), base.name)
    clock = EngineClock()
    config = EngineConfig(num_slots=n_req, max_batch_size=max(n_req, *batches), packed_linears=args.packed_linears)
    engine = Engine(base, config, clock)
    prepared = [engine.prepare_adapter(a) for a in adapters]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

    # --- hot swap latency and memory ---------------------------------------------------------------------------
    for p in prepared[:50]:  # warm-up: every slot written once, allocator settled
        engine.load_adapter(p)
    clock.swaps.clear()
    call_ms = []
    for i in range(args.swap_samples):
        start = time.perf_counter()
        engine.load_adapter(adapters[i % len(adapters)])  # a GeneratedAdapter whose id the engine prepared before
        call_ms.append((time.perf_counter() - start) * 1000)
    copy_ms = [s * 1000 for s in clock.swaps]
    fresh = make_adapters(base.model, min(args.swap_samples, 100), base.name, first=10_000)  # never prepared
    first_ms = []
    for a in fresh:
        start = time.perf_counter()
        engine.load_adapter(a)  # checked, laid out as a slot row, then copied
        first_ms.append((time.perf_counter() - start) * 1000)
    del fresh
    rss_before = rss_mb()
    for i in range(args.swaps):
        engine.load_adapter(prepared[i % len(prepared)])
    rss_after = rss_mb()
    swap = {
        "adapter": f"rank 4, q_proj+v_proj, {base.num_layers} layers, into {placement} slots of rank "
        f"{engine.config.max_rank}",
        "slot_row_mb": round(prepared[0].nbytes / 2**20, 3),
        "copy_p50_ms": round(statistics.median(copy_ms), 3),
        "copy_p95_ms": round(percentile(copy_ms, 0.95), 3),
        "load_adapter_call_p50_ms": round(statistics.median(call_ms), 3),
        "load_adapter_call_p95_ms": round(percentile(call_ms, 0.95), 3),
        "load_adapter_first_time_p50_ms": round(statistics.median(first_ms), 3),
        "load_adapter_first_time_p95_ms": round(percentile(first_ms, 0.95), 3),
        "swaps_for_memory": args.swaps,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 2),
    }
    print(
        f"swap: copy p50 {swap['copy_p50_ms']} ms (p95 {swap['copy_p95_ms']}), load_adapter() first time p50 "
        f"{swap['load_adapter_first_time_p50_ms']} ms, prepared before p50 "
        f"{swap['load_adapter_call_p50_ms']} ms, RSS {rss_after - rss_before:+.1f} MB over {args.swaps} swaps",
        flush=True,
    )

    # --- baselines: plain HF model and one PeftModel holding the adapters --------------------------------------
    from peft import PeftModel

    hf_model = load().eval()
    names = [f"a{i}" for i in range(n_req)]
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = PeftModel.from_pretrained(load(), adapters[0].save_peft(Path(tmp) / "a0"), adapter_name="a0")
        for i in range(1, n_req):
            peft_model.load_adapter(adapters[i].save_peft(Path(tmp) / f"a{i}"), adapter_name=names[i])
    peft_model.eval()
    tokenizer.padding_side = "left"

    def hf_run(model: torch.nn.Module, batch: list[str], **kwargs: object) -> Run:
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        step_clock = StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([step_clock]),
                **kwargs,
            )
        synchronize(device)
        seconds = time.perf_counter() - start
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return Run(tokens / seconds, len(batch) / median_step(step_clock.stamps))

    def peft_sequential() -> Run:
        start, tokens, steps = time.perf_counter(), 0, []
        for i in range(args.seq_requests):
            peft_model.set_adapter(names[i % n_req])
            run = hf_run(peft_model, [texts[i]])
            tokens += args.tokens
            steps.append(1 / run.decode)
        return Run(tokens / (time.perf_counter() - start), 1 / statistics.median(steps))

    ttft: list[float] = []

    def engine_run(ids: list[list[int]], adapter_list: Sequence[PreparedAdapter] | None) -> Run:
        clock.steps.clear()
        start = time.perf_counter()
        out = engine.generate_many(ids, adapter_list, params)
        seconds = time.perf_counter() - start
        if adapter_list is not None:
            ttft.extend(r.time_to_first_token or 0.0 for r in out)
        return Run(sum(r.completion_tokens for r in out) / seconds, len(ids) / median_step(clock.steps))

    warm = prepared[:n_req]
    cold_sets = [prepared[n_req : 2 * n_req], prepared[2 * n_req : 3 * n_req]]
    cold_turn = [0]

    def engine_cold() -> Run:
        cold = cold_sets[cold_turn[0] % 2]  # none of these is resident: every request swaps its adapter in
        cold_turn[0] += 1
        swaps_before = engine.stats().swaps_total  # counted when issued (CUDA copies are timed once they ran)
        run = engine_run(prompt_ids[:n_req], cold)
        assert engine.stats().swaps_total - swaps_before == n_req
        return run

    runs: dict[str, list[Run]] = {}
    paired: dict[str, dict[str, list[float]]] = {"end_to_end": {}, "decode": {}}

    def compare(contenders: list[tuple[str, Callable[[], Run]]], times: int) -> None:
        """Run the contenders back to back ``times`` times, rotating their order; keep each repetition's ratios."""
        for i in range(times):
            k = i % len(contenders)
            results: dict[str, Run] = {}
            for name, fn in contenders[k:] + contenders[:k]:
                for p in warm:
                    engine.load_adapter(p)  # untimed: the warm set is resident before every run
                results[name] = fn()
                runs.setdefault(name, []).append(results[name])
            for j, (a, _) in enumerate(contenders):
                for b, _ in contenders[j + 1 :]:
                    paired["end_to_end"].setdefault(f"{a}/{b}", []).append(
                        results[a].end_to_end / results[b].end_to_end
                    )
                    paired["decode"].setdefault(f"{a}/{b}", []).append(results[a].decode / results[b].decode)
        print(f"  {' vs '.join(name for name, _ in contenders)}: done", flush=True)

    # warm-up (the first calls at a batch size allocate): one short pass of each path, untimed
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.generate_many(prompt_ids[:n_req], warm, short)
    engine.generate_many(prompt_ids[:n_req], None, short)
    for model, extra in ((hf_model, {}), (peft_model, {"adapter_names": names})):
        enc = tokenizer(texts[:n_req], return_tensors="pt", padding=True).to(device)
        model.generate(**enc, max_new_tokens=2, **extra)  # type: ignore[operator]

    def mixed() -> Run:
        return engine_run(prompt_ids[:n_req], warm)

    def none() -> Run:
        return engine_run(prompt_ids[:n_req], None)

    def peft_mixed() -> Run:
        return hf_run(peft_model, texts[:n_req], adapter_names=names)

    slow = max(2, args.pairs // 2)
    print("comparisons:", flush=True)
    compare([("engine_mixed16", mixed), ("engine_mixed16_cold", engine_cold), ("engine_none16", none)], args.pairs)
    compare([("engine_mixed16", mixed), ("peft_mixed_batch", peft_mixed)], args.pairs)
    compare([("engine_mixed16", mixed), ("peft_sequential", peft_sequential)], slow)
    for b in batches:
        compare(
            [
                (f"engine_batch{b}", lambda b=b: engine_run(prompt_ids[:b], None)),  # type: ignore[misc]
                (f"hf_batch{b}", lambda b=b: hf_run(hf_model, texts[:b])),  # type: ignore[misc]
            ],
            args.pairs,
        )
    engine.close()

    end_to_end = {name: statistics.median(r.end_to_end for r in rs) for name, rs in runs.items()}
    decode = {name: statistics.median(r.decode for r in rs) for name, rs in runs.items()}
    ratio = {kind: {k: statistics.median(v) for k, v in d.items()} for kind, d in paired.items()}
    summary = {
        "mixed16_vs_none16": ratio["decode"]["engine_mixed16/engine_none16"],
        "mixed16_cold_vs_none16": ratio["decode"]["engine_mixed16_cold/engine_none16"],
        "mixed16_vs_none16_end_to_end": ratio["end_to_end"]["engine_mixed16/engine_none16"],
        "mixed16_cold_vs_none16_end_to_end": ratio["end_to_end"]["engine_mixed16_cold/engine_none16"],
        "engine_vs_peft_sequential": ratio["end_to_end"]["engine_mixed16/peft_sequential"],
        "engine_vs_peft_sequential_decode": ratio["decode"]["engine_mixed16/peft_sequential"],
        "engine_vs_peft_mixed_batch": ratio["end_to_end"]["engine_mixed16/peft_mixed_batch"],
        "engine_vs_peft_mixed_batch_decode": ratio["decode"]["engine_mixed16/peft_mixed_batch"],
        **{f"engine_vs_hf_batch{b}": ratio["end_to_end"][f"engine_batch{b}/hf_batch{b}"] for b in batches},
        **{f"engine_vs_hf_batch{b}_decode": ratio["decode"][f"engine_batch{b}/hf_batch{b}"] for b in batches},
    }
    checks = {
        "swap_p50_ms": swap["copy_p50_ms"],
        "mixed16_vs_none16": summary["mixed16_vs_none16"],
        "engine_vs_peft_sequential": summary["engine_vs_peft_sequential"],
        "engine_vs_peft_mixed_batch": summary["engine_vs_peft_mixed_batch"],
        "rss_growth_mb_per_1000_swaps": (rss_after - rss_before) * 1000 / max(args.swaps, 1),
        "swap_with_prepare_p50_ms": swap["load_adapter_call_p50_ms"],
    }
    targets = {}
    bounds = TARGETS
    if device.type == "cuda":
        bounds = {**TARGETS, **CUDA_TARGETS}
    for name, value in checks.items():
        op, bound, on = bounds[name]
        met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
        targets[name] = {"value": round(float(value), 3), "target": f"{op} {bound}", "measured_on": on, "met": met}
    seconds = round(time.perf_counter() - started, 1)
    results = {
        "swap": swap,
        "targets": targets,
        "ratios": {k: round(v, 3) for k, v in summary.items()},
        "end_to_end_tokens_per_s": {k: round(v, 2) for k, v in end_to_end.items()},
        "decode_tokens_per_s": {k: round(v, 2) for k, v in decode.items()},
        "ttft_mixed16_s": {"p50": round(statistics.median(ttft), 3), "max": round(max(ttft), 3)},
        "runs": {k: [[round(r.end_to_end, 2), round(r.decode, 2)] for r in v] for k, v in runs.items()},
        "paired_ratios": {kind: {k: [round(x, 3) for x in v] for k, v in d.items()} for kind, d in paired.items()},
        "notes": {
            "engine_mixed16": f"{n_req} requests, {n_req} different adapters, all resident before the run",
            "engine_mixed16_cold": f"same, none of the {n_req} adapters resident: {n_req} hot swaps inside the run",
            "peft_sequential": "one PeftModel, set_adapter + generate per request, batch 1",
            "peft_mixed_batch": "one PeftModel holding the adapters, generate(adapter_names=[...]) on the batch",
            "runs": "per run: [end-to-end tokens/s, decode tokens/s]",
            "ttft": "time to first token in the mixed-adapter runs (all requests submitted at once)",
        },
        "setup": {
            "model": f"{base.name} ({placement})",
            "device": str(device),
            "dtype": str(placement.dtype).removeprefix("torch."),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "packed_linears": engine.packing.installed,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "requests": n_req,
            "new_tokens": args.tokens,
            "repetitions": {"per_comparison": args.pairs, "peft_sequential_comparison": slow},
            "sequential_peft_requests_timed": args.seq_requests,
            "prompt_tokens": [len(p) for p in prompt_ids[:n_req]],
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "seconds": seconds,
        },
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'':>22}  {'end to end':>12}  {'decode':>12}   (tokens/s, median of runs)")
    for name in runs:
        print(f"{name:>22}: {end_to_end[name]:12.2f}  {decode[name]:12.2f}")
    print("\npaired ratios (median):")
    for name, value in summary.items():
        print(f"{name:>36}: {value:6.3f}")
    print()
    for name, check in targets.items():
        verdict = "met" if check["met"] else "MISSED"
        print(f"target {name}: {check['value']} ({check['target']}, {check['measured_on']}) {verdict}")
    print(f"\nwrote {out_path} in {seconds} s")


if __name__ == "__main__":
    main()
