"""vLLM (CPU build, with the icm-lora plugin) and icm-lora side by side, over HTTP, in one run.

    python bench/vllm_compare.py                      # 16 requests x 32 tokens, 16 adapters, 3 rounds (minutes)
    python bench/vllm_compare.py --smoke              # 2 requests x 4 tokens, 2 adapters, 1 round: checks the script
    python bench/vllm_compare.py --dtype bfloat16     # both servers in bf16 (a CPU with native bf16: AVX-512 BF16, AMX)
    python bench/vllm_compare.py --vllm-env VLLM_CPU_NUM_OF_RESERVED_CPU=0   # vLLM's worker on every core (see below)

Both servers serve the same model folder (SmolLM2-135M, the one icm-lora writes under ICM_LORA_DATA_DIR) and the same
generated adapters (icm-lora generates them; vLLM fetches them through the plugin). Per round, alternating which
server goes first (this machine's speed drifts): ``--requests`` concurrent greedy completions of ``--max-tokens``
(end tokens biased away on both servers, ``logit_bias`` -100, so every completion has that length) with no
adapter, and with ``--adapters`` different adapters (each task resolved by vLLM once beforehand, so this measures
serving, not fetching). Every request goes through one pooled HTTP client with keep-alive
(``bench.common.pooled_client``), as a real client's would, and each burst starts once the machine is quiet
(``bench.common.settle``: a server still busy after its last response slows whichever burst comes next). One untimed
burst of each workload per server comes first (its tok/s is recorded as ``warm_up_burst_tok_s``). Before each
server's turn in a round a fixed CPU workload is timed (``machine_probe_s``, ``bench.common.machine_probe``): its
spread over the run (``machine_probe_spread``) is the machine's own, a floor under either server's; and each burst
records the other server's CPU seconds meanwhile (``other_server_cpu_s``: an idle server that is not idle). Also:
single-request time to first token (streamed, median of 5), the first request
for a new task through vLLM over a repeated one (the plugin's fetch + load; target <= 2 s), start-up time and resident
memory (the process tree's RSS) of each server, and whether the greedy texts agree (in float32 they must; in bf16
the two servers' kernels round differently, so the count is recorded, not a target). ``--dtype`` sets both servers'
dtype (``ICM_LORA_DTYPE`` and vLLM's ``--dtype``; float32 by default, the dtype icm-lora's ``auto`` picks on every
CPU). Writes ``bench/results/vllm_compare.json`` (another dtype: ``vllm_compare-<dtype>.json``; ``--smoke``:
``bench/results/vllm_compare.smoke.json``, marked as a smoke run).
vLLM's CPU backend reserves one core per local worker for its scheduler and front end by default and binds its
model's OpenMP threads to the rest: on a 2-core machine one core. ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` gives its worker
every core, which was faster on a 2-core EPYC (bf16 187-222 against 178 tok/s); ``workload.vllm_env`` records it.
Needs ``.venv-vllm`` (``bash scripts/setup-vllm.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_probe, pooled_client, settle
from generator.base_model import ensure_smollm2_folder
from tests.servers import ServiceProcess, free_port
from tests.vllm.conftest import SERVED_NAME, VLLM_PYTHON, cpu_lacks_vllm, fresh_data_dir, vllm_command, vllm_env

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["a lighthouse", "a lost key", "the first snow", "a night train", "an old map", "a quiet library",
          "a red kite", "a storm at sea", "a small garden", "a broken clock", "a mountain road", "a market day",
          "a paper boat", "a late letter", "a winter fox", "a summer fair"]  # fmt: skip


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (vLLM's engine runs in a child process)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        found.append(current)
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of a process tree."""
    total = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process tree has used so far."""
    ticks = 0
    for current in process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


NO_EOS: dict[str, float] = {}  # set in main: the model's end tokens biased away on both servers


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 matrix instructions (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name} ({', '.join(bf16) if bf16 else 'no native bf16'})"


def eos_bias(model_dir: Path) -> dict[str, float]:
    """``logit_bias`` that keeps a completion writing to ``max_tokens`` on both servers (generated task adapters stop
    after their answer, which would turn a throughput round into a time-to-first-token round): every end token of the
    model's generation config and tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig

    ids: set[int] = set()
    configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    ids.update([configured] if isinstance(configured, int) else list(configured or []))
    tokenizer_eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    if tokenizer_eos is not None:
        ids.add(int(tokenizer_eos))
    return {str(token): -100.0 for token in sorted(ids)}


def complete(http: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_EOS}
    response = http.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    answer = response.json()
    return answer["choices"][0]["text"], int(answer["usage"]["completion_tokens"])


def burst(
    http: httpx.Client, url: str, models: list[str], prompts: list[str], max_tokens: int
) -> tuple[float, list[str]]:
    """tokens/s of len(prompts) concurrent requests, and their texts."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(lambda mp: complete(http, url, mp[0], mp[1], max_tokens), zip(models, prompts, strict=True))
        )
    seconds = time.perf_counter() - start
    return sum(n for _, n in results) / seconds, [t for t, _ in results]


def vllm_env_overrides(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--vllm-env`` NAME=VALUE pairs, over the VLLM_CPU_* variables already set in this shell (which vLLM would read
    as well): what the run's JSON records as vLLM's environment settings."""
    env = {name: value for name, value in os.environ.items() if name.startswith("VLLM_CPU_")}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"--vllm-env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def time_to_first_token(http: httpx.Client, url: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="identical rounds (5: the spread target of issue 14)")
    parser.add_argument("--smoke", action="store_true", help="2 requests x 4 tokens, 2 adapters, 1 round")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both servers' dtype")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    parser.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for vLLM's processes only (repeatable), e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    vllm_extra_env = vllm_env_overrides(args.vllm_env, parser)
    if args.smoke:
        args.requests, args.max_tokens, args.adapters, args.rounds = 2, 4, 2, 1
    name = "vllm_compare" if args.dtype == "float32" else f"vllm_compare-{args.dtype}"
    out = args.out or RESULTS / (f"{name}.smoke.json" if args.smoke else f"{name}.json")
    reason = cpu_lacks_vllm()
    if reason or not VLLM_PYTHON.is_file():
        sys.exit(reason or f"{VLLM_PYTHON} is missing: bash scripts/setup-vllm.sh")
    load_at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="vllm-compare-"))
    data_dir = fresh_data_dir(tmp / "data")  # an empty registry, the shared model folder

    icm = ServiceProcess(
        {"ICM_LORA_DATA_DIR": str(data_dir), "ICM_LORA_SELF_CHECK": "keep", "ICM_LORA_TASK_STORE": "sqlite",
         "ICM_LORA_MAX_BATCH_SIZE": str(max(16, args.requests)), "ICM_LORA_DTYPE": args.dtype,
         "ICM_LORA_NUM_SLOTS": str(max(32, args.adapters))},  # vLLM gets --max-loras args.adapters
        tmp / "icm-lora.log", unset=["ICM_LORA_REDIS_URL"],
    )  # fmt: skip
    icm_start_s = icm.start(timeout_s=600)
    model = ensure_smollm2_folder(data_dir)
    NO_EOS.update(eos_bias(model))
    port = free_port()
    vllm_url = f"http://127.0.0.1:{port}"
    env = vllm_env(icm.url, tmp / "adapters", port)
    # the plugin's own re-check period (5 s), as deployed: the tests' 0.5 s had vLLM ask icm-lora about every resolved
    # task twice a second, during both servers' bursts
    env.pop("ICM_LORA_VLLM_REFRESH_S")
    env.update(vllm_extra_env)
    with (tmp / "vllm.log").open("wb") as log:
        vllm = subprocess.Popen(
            [*vllm_command(VLLM_PYTHON, model, port, args.dtype), "--max-loras", str(args.adapters), *args.vllm_arg],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    start = time.monotonic()
    while True:
        if vllm.poll() is not None:
            sys.exit(f"vLLM exited: see {tmp / 'vllm.log'}")
        try:
            if httpx.get(f"{vllm_url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    vllm_start_s = time.monotonic() - start
    servers = {"icm-lora": icm.url, "vllm": vllm_url}
    assert icm.proc is not None
    pids = {"icm-lora": icm.proc.pid, "vllm": vllm.pid}
    client = pooled_client(2 * (args.requests + 4), timeout=600)  # both servers' connections
    try:
        tasks: list[str] = []
        with httpx.Client(base_url=icm.url, timeout=600) as http:
            for n in range(args.adapters + 3):
                topic, task_id = TOPICS[n % 16], f"bench-{n}"
                example = {"input": f"Topic {n}", "output": f"A short text about {topic}."}
                body = {"task_id": task_id, "description": f"Write about {topic}.", "examples": [example]}
                assert http.post("/v1/tasks", json=body).status_code == 201
                tasks.append(task_id)
        adapter_tasks, new_tasks = tasks[: args.adapters], tasks[args.adapters :]
        prompts = [f"Input: Tell me about {TOPICS[i % 16]}.\nOutput:" for i in range(args.requests)]

        # the first request of a new task through vLLM (fetch + load) over a repeated one
        first_overhead = []
        for task in new_tasks:
            t0 = time.perf_counter()
            complete(client, vllm_url, task, prompts[0], 1)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            complete(client, vllm_url, task, prompts[0], 1)
            first_overhead.append(first - (time.perf_counter() - t0))
        for task in adapter_tasks:  # resolved once, so the adapter phase measures serving
            complete(client, vllm_url, task, prompts[0], 1)
        # one untimed burst of each workload per server: first-use costs (buffers sized for 16 rows, kernels for new
        # shapes) fall outside the rounds; their tok/s is recorded
        models = [adapter_tasks[i % len(adapter_tasks)] for i in range(args.requests)]
        warm_up: dict[str, dict[str, float]] = {}
        for name, url in servers.items():
            settle()
            base_tps = burst(client, url, [SERVED_NAME] * args.requests, prompts, args.max_tokens)[0]
            settle()
            lora_tps = burst(client, url, models, prompts, args.max_tokens)[0]
            warm_up[name] = {"no_adapter_tok_s": round(base_tps, 1), "adapters_tok_s": round(lora_tps, 1)}

        rounds: list[dict[str, Any]] = []  # {"order": [...], server: {figure: tok/s}}
        mismatches, compared = 0, 0
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            row: dict[str, dict[str, Any]] = {}
            texts: dict[str, dict[str, list[str]]] = {}
            for name in order:
                other = pids["vllm" if name == "icm-lora" else "icm-lora"]
                settle()
                probe_s = machine_probe()
                quiet_s = [settle()]
                other_cpu = cpu_s(other)
                base_tps, base_texts = burst(
                    client, servers[name], [SERVED_NAME] * args.requests, prompts, args.max_tokens
                )
                other_cpu_s = [round(cpu_s(other) - other_cpu, 2)]
                quiet_s.append(settle())
                other_cpu = cpu_s(other)
                lora_tps, lora_texts = burst(client, servers[name], models, prompts, args.max_tokens)
                other_cpu_s.append(round(cpu_s(other) - other_cpu, 2))
                row[name] = {
                    "no_adapter_tok_s": round(base_tps, 1),
                    "adapters_tok_s": round(lora_tps, 1),
                    "waited_for_quiet_s": quiet_s,
                    "other_server_cpu_s": other_cpu_s,  # the idle server's CPU use during each burst
                    "machine_probe_s": round(probe_s, 3),  # a fixed workload just before (bench.common)
                }
                texts[name] = {"base": base_texts, "lora": lora_texts}
            for kind in ("base", "lora"):
                pairs = zip(texts["icm-lora"][kind], texts["vllm"][kind], strict=True)
                mismatches += sum(a != b for a, b in pairs)
                compared += len(texts["vllm"][kind])
            rounds.append({"order": order, **row})
            print(json.dumps(rounds[-1]), flush=True)

        ttft: dict[str, dict[str, float]] = {}
        for name, url in servers.items():
            settle()
            ttft[name] = {
                "no_adapter_ms": round(1000 * statistics.median(
                    time_to_first_token(client, url, SERVED_NAME, prompts[0]) for _ in range(5)), 1),
                "adapter_ms": round(1000 * statistics.median(
                    time_to_first_token(client, url, adapter_tasks[0], prompts[0]) for _ in range(5)), 1),
            }  # fmt: skip
        rss = {name: round(rss_mb(pid), 1) for name, pid in pids.items()}
    finally:
        client.close()
        vllm.terminate()
        try:
            vllm.wait(timeout=60)
        except subprocess.TimeoutExpired:
            vllm.kill()
        icm.stop()

    def median(server: str, key: str) -> float:
        return statistics.median(r[server][key] for r in rounds)

    overhead = max(first_overhead)

    def spread(server: str, key: str) -> float:
        """Largest distance of a round from the median, as a fraction of the median."""
        values = [r[server][key] for r in rounds]
        mid = statistics.median(values)
        return round(max(abs(v - mid) for v in values) / mid, 3) if mid else float("nan")

    ratios = {
        key: round(median("icm-lora", key) / median("vllm", key), 3) if median("vllm", key) else float("nan")
        for key in ("no_adapter_tok_s", "adapters_tok_s")
    }
    icm_spread = max(spread("icm-lora", "no_adapter_tok_s"), spread("icm-lora", "adapters_tok_s"))
    probes = [r[s]["machine_probe_s"] for r in rounds for s in servers]
    probe_median = statistics.median(probes)
    machine_spread = round(max(abs(v - probe_median) for v in probes) / probe_median, 3)
    result = {
        "smoke": args.smoke,
        "note": "a smoke run: checks the script end to end, its figures are not a measurement" if args.smoke else "",
        "workload": {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "adapters": args.adapters,
            "rounds": args.rounds,
            "vllm_args": args.vllm_arg,
            "vllm_env": vllm_extra_env,  # set for vLLM's processes only (VLLM_CPU_* set in the shell show here too)
            "dtype": args.dtype,
            "client": "one pooled httpx.Client, keep-alive (before 2026-12-07: a new client per request)",
            "vllm_plugin_refresh_s": "5 (the plugin's default; before 2026-12-07: 0.5)",
        },
        "throughput_tok_s_median": {
            s: {"no_adapter": median(s, "no_adapter_tok_s"), "adapters": median(s, "adapters_tok_s")} for s in servers
        },
        "rounds": rounds,
        "warm_up_burst_tok_s": warm_up,
        "time_to_first_token": ttft,
        "startup_s": {"icm-lora": round(icm_start_s, 1), "vllm": round(vllm_start_s, 1)},
        "rss_mb_after": rss,
        "vllm_first_request_overhead_s": [round(s, 3) for s in first_overhead],
        "greedy_texts_compared": compared,
        "targets": {
            "vllm_first_request_overhead_s": {"value": round(overhead, 3), "target": "<= 2.0", "met": overhead <= 2.0},
            "greedy_mismatches": {"value": mismatches, "target": "== 0", "met": mismatches == 0}
            if args.dtype == "float32"
            else {"value": mismatches, "target": "recorded (bf16 kernels round differently)", "met": None},
            # issue 14: icm-lora over HTTP against vLLM-CPU, side by side in this run
            "icm_over_vllm_no_adapter": {
                "value": ratios["no_adapter_tok_s"],
                "target": ">= 1.5",
                "met": ratios["no_adapter_tok_s"] >= 1.5,
            },
            "icm_over_vllm_adapters": {
                "value": ratios["adapters_tok_s"],
                "target": ">= 1.5",
                "met": ratios["adapters_tok_s"] >= 1.5,
            },
            "icm_spread_vs_median": {
                "value": icm_spread,
                "target": f"<= 0.10 over {len(rounds)} identical rounds (5 wanted)",
                "met": icm_spread <= 0.10 and len(rounds) >= 5,
                # the same measure for a fixed CPU workload timed before every burst pair of both servers: the
                # machine's own spread in this run
                "machine_probe_spread": machine_spread,
            },
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("throughput_tok_s_median", "time_to_first_token", "targets")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
