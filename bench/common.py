"""Small pieces the benchmark scripts share: the machine-load record every result carries, waiting for the machine
to go quiet between paired runs, one pooled HTTP client per run, and running a set of request threads to completion."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx


def load_record(before: tuple[float, float, float], note: str) -> dict[str, Any]:
    """The load average before the run and now, the thread setting and the operator's note."""
    return {
        "loadavg_before": [round(x, 2) for x in before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "note": note,
    }


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def settle(busy_below: float = 0.1, window_s: float = 0.25, max_s: float = 15.0) -> float:
    """Wait until the machine's CPUs are busy less than ``busy_below`` of one ``window_s`` window (at most ``max_s``);
    return the seconds waited. Between the two sides of a paired run: a server that keeps its cores busy after its
    last response (vLLM's engine process polls for a while) would otherwise slow whichever side runs next."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        busy0, total0 = _cpu_times()
        time.sleep(window_s)
        busy1, total1 = _cpu_times()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return round(time.monotonic() - start, 2)


def machine_probe(repeats: int = 4000) -> float:
    """Seconds of a fixed CPU workload: ``repeats`` fp32 matmuls of a SmolLM2 decode shape (16 rows x 576 @ 576 x
    1536) on every core. Timed between the rounds of a paired benchmark, its spread is the machine's own (seen on a
    2-core cloud VM: +-10% over 12 runs of a 0.9 s loop), a floor under any server's run-to-run spread there."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(576, 1536, generator=generator)
        rows = torch.randn(16, 576, generator=generator)
        start = time.perf_counter()
        for _ in range(repeats):
            rows @ weight
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def pooled_client(connections: int, **options: Any) -> httpx.Client:
    """One connection pool for every request of a run, as a real client keeps (``options``: ``httpx.Client``'s). A
    client made per request (``httpx.post``, or a ``Client`` per request thread) builds an SSL context each time: about
    18 ms of CPU on this 2-core machine, 0.3 s per burst of 16, spent on the servers' cores (the HTTP benchmarks paid it
    before 2026-12-07)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(limits=limits, **options)


def run_threads(jobs: Iterable[Callable[[], None]]) -> None:
    """Start one thread per job, all at once, and wait for every one."""
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def sharded_cli(
    doc: str | None,
    score: Callable[[argparse.Namespace], None],
    summary: Callable[[argparse.Namespace], None],
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    out: Path | None = None,
    summary_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The command line of a paired scoring script: ``score`` (one single-threaded process per shard: ``--shard I
    --shards N``; ``--threads``, ``--max-length`` and the script's own ``arguments``) and ``summary``, both with
    ``--out`` (required where there is no default); ``summary_arguments`` adds the summary's own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("score")
    if arguments is not None:
        arguments(run)
    run.add_argument("--shard", type=int, default=0)
    run.add_argument("--shards", type=int, default=1)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--max-length", type=int, default=96)
    summarise = sub.add_parser("summary")
    if summary_arguments is not None:
        summary_arguments(summarise)
    for command in (run, summarise):
        command.add_argument("--out", type=Path, default=out, required=out is None)
    args = parser.parse_args()
    if args.command == "score":
        score(args)
    else:
        summary(args)
