"""Small pieces the benchmark scripts share: the machine-load record every result carries, and running a set of
request threads to completion."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any


def load_record(before: tuple[float, float, float], note: str) -> dict[str, Any]:
    """The load average before the run and now, the thread setting and the operator's note."""
    return {
        "loadavg_before": [round(x, 2) for x in before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "note": note,
    }


def run_threads(jobs: Iterable[Callable[[], None]]) -> None:
    """Start one thread per job, all at once, and wait for every one."""
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
