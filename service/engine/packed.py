"""oneDNN-packed Linear weights for generation on the CPU.

On the CPU ``F.linear`` hands the weight to a GEMM that lays it out for its kernels again on every call. oneDNN can
lay each weight out once (``torch.ops.mkldnn._reorder_linear_weight``, what torch's inductor does for frozen CPU
models) and run every later call on that blocked copy (``torch.ops.mkldnn._linear_pointwise``). For SmolLM2-135M in
fp32 on a 2-core AMD EPYC (AVX-512) a decode step at batch 8 / 16 ran 1.8x / 1.6x faster, the 49152-row ``lm_head``
about 3x (see the README's hot-path section for the measured service figures).

Costs and limits:

- **Memory**: the packed copy is as large as the Linears' weights (about 540 MB for SmolLM2 in fp32; the plain
  weights stay, see below). ``ICM_LORA_PACKED_LINEARS=false`` turns it off.
- **Rounding**: oneDNN sums in another order than the plain GEMM, so results differ by float rounding (about 1e-4
  in SmolLM2's fp32 logits) and a greedy token can leave plain peft's at a near tie. The passes that make adapters
  (the task vector's hidden-state read and the self-check's scoring) therefore run inside ``exact()`` on the plain
  weights, so task vectors, adapter ids and self-check scores stay bit-equal to the offline pipeline's; only
  generation (prefill and decode) uses the packed copies.
- **Where**: the CPU only, float32 or bfloat16, when this torch build has the oneDNN ops and a probe agrees with
  ``F.linear`` (``packing_unavailable`` says why not). A tensor that needs a gradient always takes ``F.linear``.

A plain ``nn.Linear`` of the model becomes a ``PackedLinear`` (an ``nn.Linear`` with the same parameters, so module
names and ``state_dict`` keys do not change); the engine's ``SlottedLoraLinear`` asks ``PackedWeights.linear`` for its
base projection itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def packing_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when packed Linears can run here, else why not (a sentence for the log)."""
    if device.type != "cpu":
        return f"packed Linears are a CPU path (the model is on {device})"
    if dtype not in PACKED_DTYPES:
        return f"packed Linears run float32 and bfloat16, not {dtype}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN linear ops"
    try:  # a probe: oneDNN may lack kernels for this CPU and dtype
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 32, generator=generator).to(dtype)
        x = torch.randn(3, 2, 32, generator=generator).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        want = F.linear(x, weight)
    except RuntimeError as exc:
        return f"oneDNN's packed linear failed on this CPU: {exc}"
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
        return "oneDNN's packed linear disagrees with F.linear on this CPU"
    return None


class PackedWeights:
    """The packed copy of each Linear weight of one model, by module; empty (every call plain) until ``install``."""

    def __init__(self) -> None:
        self._packed: dict[int, torch.Tensor] = {}
        self._exact = 0
        self._originals: list[tuple[nn.Module, str, nn.Linear]] = []

    @property
    def installed(self) -> bool:
        return bool(self._packed)

    def install(self, model: nn.Module, batch_hint: int) -> None:
        """Pack every Linear weight of ``model`` (laid out for about ``batch_hint`` rows; any row count runs) and turn
        its plain ``nn.Linear`` modules into ``PackedLinear``. Subclasses (the engine's slotted layers) stay and call
        ``linear`` themselves."""
        if self._packed:
            raise RuntimeError("packed weights are already installed")
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            layer = module
            if type(module) is nn.Linear:
                layer = PackedLinear(module, self)
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, leaf, layer)
                self._originals.append((parent, leaf, module))
            with torch.no_grad():
                self._packed[id(layer)] = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), batch_hint)

    def uninstall(self) -> None:
        """Put the plain Linear modules back and drop the packed copies."""
        for parent, leaf, original in self._originals:
            setattr(parent, leaf, original)
        self._originals.clear()
        self._packed.clear()

    @property
    def nbytes(self) -> int:
        """Memory of the packed copies (their plain size: oneDNN pads little for these shapes)."""
        return sum(p.numel() * p.element_size() for p in self._packed.values())

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, module.weight, module.bias)``, on the packed weight outside ``exact()``."""
        packed = None if self._exact else self._packed.get(id(module))
        if packed is None or x.requires_grad or x.dtype != module.weight.dtype:
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    @contextmanager
    def exact(self) -> Iterator[None]:
        """Plain weights inside (the passes that make adapters: bit-equal to the offline pipeline)."""
        self._exact += 1
        try:
            yield
        finally:
            self._exact -= 1

    def run_exact(self, fn: Callable[[], T]) -> T:
        with self.exact():
            return fn()


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same weight and bias objects) whose forward uses the model's ``PackedWeights``."""

    def __init__(self, base: nn.Linear, packing: PackedWeights) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._packing = packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packing.linear(self, x)
