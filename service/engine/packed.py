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

**Fused projections.** Projections that read the same input are packed as one weight, so a pass runs one GEMM where
the model runs several (as vLLM's ``qkv_proj`` and ``gate_up_proj``): a Llama attention layer's ``q_proj``,
``k_proj`` and ``v_proj`` (``FusedQKVAttention``) and a gated MLP's ``gate_proj`` and ``up_proj`` (``FusedGateUpMLP``).
Each part's slice of the output then goes through its own layer's ``complete`` (a slotted layer adds its LoRA there,
a ``PackedLinear`` nothing), so adapters on any of them still apply. Fewer, wider GEMMs and fewer calls: on SmolLM2
at batch 16 (fp32, 2-core AMD EPYC with AVX2) the median decode step went from 162.5 to 157.7 ms without adapters
(3 alternating process pairs; docs/performance.md). The parts' own packed copies are dropped (the fused copy replaces
them: no more memory); inside ``exact()`` the fused modules call their parts one by one on the plain weights, the
same ops as transformers' own modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)

T = TypeVar("T")
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# transformers' gated MLPs whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked per version in
# tests/engine/test_packed.py); Phi-3's MLP has a fused ``gate_up_proj`` of its own
GATED_MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "MistralMLP", "Gemma2MLP", "Gemma3MLP"})


@runtime_checkable
class Projection(Protocol):
    """A Linear of the model after ``install`` (``PackedLinear`` or the engine's slotted layer): its output, given
    its base projection ``y`` of ``x`` (a slotted layer adds its LoRA)."""

    def complete(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class KVCache(Protocol):
    """What an attention layer writes its keys and values to (transformers' ``Cache``, the engine's caches)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        self._bias: dict[int, torch.Tensor] = {}  # a fused projection's biases, concatenated
        self._exact = 0
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []

    @property
    def installed(self) -> bool:
        return bool(self._packed)

    def install(self, model: nn.Module, batch_hint: int) -> None:
        """Pack every Linear weight of ``model`` (laid out for about ``batch_hint`` rows; any row count runs) and turn
        its plain ``nn.Linear`` modules into ``PackedLinear``. Subclasses (the engine's slotted layers) stay and call
        ``linear`` themselves. Then each Llama attention layer and gated MLP becomes its fused module (one packed
        weight for q, k and v; one for gate and up)."""
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
        for name, module in list(model.named_modules()):
            fused: FusedQKVAttention | FusedGateUpMLP
            if type(module) is LlamaAttention:
                fused = FusedQKVAttention(module, self)
            elif type(module).__name__ in GATED_MLPS:
                fused = FusedGateUpMLP(module, self)
            else:
                continue
            if self._pack_parts(fused, batch_hint):
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, leaf, fused)
                self._originals.append((parent, leaf, module))

    def _pack_parts(self, fused: FusedQKVAttention | FusedGateUpMLP, batch_hint: int) -> bool:
        """Pack ``fused``'s parts as one weight; False when they cannot be (a part that is not a packed or slotted
        Linear, or biases on some parts only)."""
        linears = [layer for layer in fused.parts() if isinstance(layer, nn.Linear) and isinstance(layer, Projection)]
        if len(linears) != len(fused.parts()):
            return False
        biases = [layer.bias for layer in linears]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return False
        with torch.no_grad():
            weight = torch.cat([layer.weight.detach() for layer in linears])
            self._packed[id(fused)] = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            if biases[0] is not None:
                self._bias[id(fused)] = torch.cat([b.detach() for b in biases if b is not None])
        for layer in linears:
            self._packed.pop(id(layer), None)  # the fused copy serves them: no second copy of their weights
        return True

    def uninstall(self) -> None:
        """Put the plain modules back and drop the packed copies."""
        for parent, leaf, original in reversed(self._originals):
            setattr(parent, leaf, original)
        self._originals.clear()
        self._packed.clear()
        self._bias.clear()

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

    def fused_linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The fused projection of ``module`` (one of the fused modules below) on ``x``; None inside ``exact()``, for a
        tensor that needs a gradient, or one of another dtype (the module then calls its parts one by one)."""
        packed = None if self._exact else self._packed.get(id(module))
        if packed is None or x.requires_grad or x.dtype != packed.dtype:
            return None
        return torch.ops.mkldnn._linear_pointwise(x, packed, self._bias.get(id(module)), "none", [], "")

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

    def complete(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Its output given its base projection ``y`` (a fused projection's slice): ``y`` itself."""
        return y


def _slices(parts: Sequence[nn.Linear], fused: torch.Tensor) -> list[torch.Tensor]:
    """Each part's slice of the fused projection ``fused`` (views)."""
    return list(fused.split_with_sizes([layer.out_features for layer in parts], dim=-1))


def _complete(parts: Sequence[nn.Linear], x: torch.Tensor, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each part's output from its slice ``ys`` of the fused projection of ``x`` (``install`` checked that every part
    is a ``Projection``): the slice itself where no LoRA is added."""
    return [cast(Projection, layer).complete(x, y) for layer, y in zip(parts, ys, strict=True)]


def rotate_together(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb``'s ops on query and key heads in one tensor [B, heads, T, D]: elementwise, so each
    element gets the bits it gets apart, in 5 ops instead of 10 (a decode step's small ops cost 5-30 us each on the
    CPU, whatever their size)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (states * cos) + (rotate_half(states) * sin)


class FusedQKVAttention(nn.Module):
    """transformers' ``LlamaAttention`` (the same children and attributes, so the same ``state_dict`` keys) whose
    ``q_proj``, ``k_proj`` and ``v_proj`` run as one GEMM on a fused packed weight outside ``exact()``. The rest of
    the forward is ``LlamaAttention.forward``'s, op for op (``tests/engine/test_packed.py`` checks them equal)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear

    def __init__(self, base: LlamaAttention, packing: PackedWeights) -> None:
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        self.config = base.config
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.num_key_value_groups = base.num_key_value_groups
        self.scaling = base.scaling
        self.attention_dropout = base.attention_dropout
        self.is_causal = base.is_causal
        self._packing = packing

    def parts(self) -> tuple[nn.Linear, ...]:
        """The projections the fused GEMM computes, in the order of its output."""
        return (self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        parts = self.parts()
        fused = self._packing.fused_linear(self, hidden_states)
        together = None
        if fused is None:
            q, k, v = (layer(hidden_states) for layer in parts)
        else:
            ys = _slices(parts, fused)
            q, k, v = _complete(parts, hidden_states, ys)
            if q is ys[0] and k is ys[1]:  # no LoRA on either: still adjacent in the fused output
                together = fused[..., : q.shape[-1] + k.shape[-1]]
        value_states = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if together is None:
            query_states, key_states = apply_rotary_pos_emb(
                q.view(hidden_shape).transpose(1, 2), k.view(hidden_shape).transpose(1, 2), cos, sin
            )
        else:
            both = rotate_together(together.view(hidden_shape).transpose(1, 2), cos, sin)
            query_states, key_states = both.split_with_sizes(
                [q.shape[-1] // self.head_dim, k.shape[-1] // self.head_dim], 1
            )
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
            ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class FusedGateUpMLP(nn.Module):
    """A gated MLP of ``GATED_MLPS`` (same children) whose ``gate_proj`` and ``up_proj`` run as one GEMM on a fused
    packed weight outside ``exact()``: ``down_proj(act_fn(gate) * up)``, as the model's own."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module  # transformers' activations are modules (ACT2FN)

    def __init__(self, base: nn.Module, packing: PackedWeights) -> None:
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        self._packing = packing

    def parts(self) -> tuple[nn.Linear, ...]:
        """The projections the fused GEMM computes, in the order of its output."""
        return (self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.parts()
        fused = self._packing.fused_linear(self, x)
        if fused is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate, up = _complete(parts, x, _slices(parts, fused))
        return self.down_proj(self.act_fn(gate) * up)
