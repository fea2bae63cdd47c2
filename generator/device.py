"""Where models run: a device and a dtype, chosen once from two strings and checked before anything loads.

``device``: ``auto`` (CUDA when a GPU is present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``.

``resolve_placement`` raises ``PlacementError`` (a ``ValueError``) with a message saying what is wrong and what to
set instead: CUDA asked for on a machine without one, a GPU index that does not exist, a dtype the device cannot run.
On the CPU ``auto`` is always float32: a CPU whose torch kernels have no native bf16/fp16 path runs those matmuls
about 100x slower than fp32 (0.9 vs 112 GFLOP/s at 1024x1024 on the AMD AVX2 host the issue measured). Asking for
bf16/fp16 on a CPU runs a probe of a few milliseconds (``cpu_matmul_slowdown``) and logs a warning that says why it
is slow when it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache

import torch

from generator.defaults import (  # re-exported: the checks that need no torch
    DEVICE_CHOICES as DEVICE_CHOICES,
)
from generator.defaults import (
    DTYPE_CHOICES as DTYPE_CHOICES,
)
from generator.defaults import (
    PlacementError as PlacementError,
)
from generator.defaults import (
    check_device_name as check_device_name,
)
from generator.defaults import (
    check_dtype_name as check_dtype_name,
)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert ("auto", *DTYPES) == DTYPE_CHOICES


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """``cpu-float32``, ``cuda-bfloat16``: the file-name form (benchmark results)."""
        return f"{self.device.type}-{dtype_name(self.dtype)}"

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The device and dtype to use, checked against this machine (see the module docstring)."""
    device_name, dtype_name = check_device_name(device), check_dtype_name(dtype)
    cuda = torch.cuda.is_available()
    if device_name == "auto":
        device_name = "cuda" if cuda else "cpu"
    chosen = torch.device(device_name)
    if chosen.type == "cuda":
        if not cuda:
            built = torch.version.cuda
            why = (
                "this torch build has no CUDA support (a CPU wheel); install a CUDA build of torch==2.13.0"
                if not built
                else f"torch was built for CUDA {built} but sees no GPU (driver, CUDA_VISIBLE_DEVICES, container flags)"
            )
            raise PlacementError(f"device {device!r} asks for a GPU, but {why}; or set the device to cpu")
        count = torch.cuda.device_count()
        index = 0 if chosen.index is None else chosen.index
        if index >= count:
            raise PlacementError(f"device {device!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
        chosen = torch.device("cuda", index)
    if dtype_name == "auto":
        if chosen.type == "cuda":
            dtype_name = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        else:
            dtype_name = "float32"
    placement = Placement(chosen, DTYPES[dtype_name])
    _check_dtype(placement)
    return placement


def _check_dtype(placement: Placement) -> None:
    if placement.device.type == "cuda":
        if placement.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(placement.device)
            raise PlacementError(f"{name} has no native bfloat16 (compute capability < 8.0); use float16 or float32")
        return
    if placement.dtype == torch.float32:
        return
    slowdown = cpu_matmul_slowdown(placement.dtype)
    if slowdown > SLOW_CPU_DTYPE:
        log.warning(
            "%s on this CPU: its matmuls measured %.0fx slower than float32 (no native bf16/fp16 matrix instructions "
            "used by torch here), so models run far slower; use float32 on this CPU unless you are checking "
            "low-precision parity",
            str(placement.dtype).removeprefix("torch."),
            slowdown,
        )


SLOW_CPU_DTYPE = 4.0  # a low-precision matmul this many times slower than fp32 earns the warning


@cache
def cpu_matmul_slowdown(dtype: torch.dtype, size: int = 128, repeats: int = 3) -> float:
    """How many times slower a ``size``x``size`` matmul runs in ``dtype`` than in float32 on this CPU (a probe of a
    few milliseconds, once per process). CPU flags are not enough: torch may not use the bf16 instructions a CPU
    advertises, and the same CPU model differs between hosts."""
    seconds = {}
    for kind in (torch.float32, dtype):
        a = torch.ones(size, size, dtype=kind)
        a @ a  # warm-up (kernel selection)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        seconds[kind] = time.perf_counter() - start
    return seconds[dtype] / max(seconds[torch.float32], 1e-9)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
