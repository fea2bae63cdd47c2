"""What attending each row alone costs the engine in bf16 on the CPU (``service/engine/attention.py``).

    python bench/row_attention.py                  # -> bench/results/row_attention.json, about a minute

SmolLM2-135M in bf16, the service's CPU path otherwise (packed Linears, 32 slots, the engine thread multi-threaded):
16 requests with 16 distinct adapters x 32 greedy tokens (EOS ignored), once per engine after an untimed warm-up
burst. Two engines alternate ``--rounds`` times: decode steps that attend each row alone over its own keys
(``EngineConfig.attend_rows_alone``, the default), and one SDPA call over the left-padded rows (off). Reports tok/s,
their ratio, and how many of the 16 greedy token rows the two give alike (they differ where padding flips a near
tie).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_record
from bench.engine import make_adapters, prompts
from generator.base_model import load_base_model
from generator.device import Placement
from service.engine import Engine, EngineConfig, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load-note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "row_attention.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the service: only the engine thread multi-threaded
    base = load_base_model("smollm2-135m", placement=Placement(torch.device("cpu"), torch.bfloat16))
    adapters = make_adapters(base.model, args.requests, base.name)
    ids = [base.tokenizer(p)["input_ids"] for p in prompts(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    tok_s: dict[str, list[float]] = {"rows_alone": [], "padded_sdpa": []}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for mode in tok_s:
            config = EngineConfig(
                num_slots=32,
                max_batch_size=32,
                packed_linears=True,
                attend_rows_alone=mode == "rows_alone",
                threads=threads,
            )
            with Engine(base, config) as engine:
                assert engine.attention.installed == (mode == "rows_alone")
                prepared = [engine.prepare_adapter(a) for a in adapters]
                for h in [engine.submit(i, adapter=a, params=params) for i, a in zip(ids, prepared, strict=True)]:
                    h.result()  # warm-up burst
                start = time.perf_counter()
                handles = [engine.submit(i, adapter=a, params=params) for i, a in zip(ids, prepared, strict=True)]
                tokens[mode] = [h.result().token_ids for h in handles]
                tok_s[mode].append(round(sum(map(len, tokens[mode])) / (time.perf_counter() - start), 1))
    medians = {mode: statistics.median(values) for mode, values in tok_s.items()}
    result = {
        "what": "bf16 engine throughput, decode attention row by row vs SDPA over left-padded rows",
        "model": "smollm2-135m (bf16, CPU, packed Linears)",
        "workload": {"requests": args.requests, "adapters": args.requests, "max_tokens": args.max_tokens},
        "tok_s": tok_s,
        "median_tok_s": medians,
        "rows_alone_over_padded": round(medians["rows_alone"] / medians["padded_sdpa"], 3),
        "same_token_rows": sum(a == b for a, b in zip(tokens["rows_alone"], tokens["padded_sdpa"], strict=True)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "engine_threads": threads},
        "load": load_record(load_before, args.load_note),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
