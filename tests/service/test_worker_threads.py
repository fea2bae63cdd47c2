"""The service's worker threads start no OpenMP team of their own (``service.main.one_thread_executor``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from service.main import one_thread_executor


def threads_added_by_a_first_gemm(executor: ThreadPoolExecutor) -> int:
    """Threads of this process that a worker's first op, an fp32 ``F.linear``, leaves behind (its OpenMP team)."""

    def gemm() -> None:
        F.linear(torch.randn(64, 512), torch.randn(512, 512))

    with executor:
        executor.submit(lambda: None).result()  # the worker thread itself
        before = len(os.listdir("/proc/self/task"))
        executor.submit(gemm).result()
        return len(os.listdir("/proc/self/task")) - before


def test_a_worker_thread_runs_its_first_gemm_without_an_openmp_team_of_its_own() -> None:
    assert Path("/proc/self/task").is_dir() and (os.cpu_count() or 1) >= 2, "needs Linux and 2 cores or more"
    assert threads_added_by_a_first_gemm(one_thread_executor(1)) == 0
    # a plain thread's first GEMM starts a team of the machine's cores (what the service's workers did before); last,
    # since the team's thread leaves only some time after its thread has been joined
    assert threads_added_by_a_first_gemm(ThreadPoolExecutor(1)) >= 1
