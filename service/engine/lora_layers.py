"""LoRA slots inside the resident model: preallocated A/B buffers per target Linear and a per-row delta.

Every target ``nn.Linear`` (``q_proj``, ``v_proj``...) is replaced by a ``SlottedLoraLinear`` that shares the
original weight and bias and holds two buffers, ``lora_A[slots + 1, R, in]`` and ``lora_B[slots + 1, out, R]``. The
last slot stays zero: rows without an adapter point at it. Before each forward pass the engine says which slot each
batch row uses (``LoraBank.activate``); the layer gathers those rows' A/B and adds ``scale * B @ A @ x`` with two
batched matmuls, so one forward pass serves any mix of adapters (the S-LoRA / Punica scheme, here with plain
``index_select`` + ``bmm``).

All those buffers are views into one ``[slots + 1, slot_numel]`` tensor: a slot is one contiguous row holding every
layer's A and B. An adapter is laid out like a row once (``LoraBank.prepare``, on the caller's thread); swapping it in
is then a single in-place ``copy_`` of that row: no allocation, no reload, one memcpy (one transfer on a GPU).

Adapters of a smaller rank than the slots are zero-padded, which is exact: the padded rows of A and columns of B add
terms that are exactly zero.

The wrapper is an ``nn.Linear`` subclass with the same parameters, so module names, ``state_dict`` keys and
``LoraLayout.from_model`` are unchanged; the slot buffers are not persistent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generator.adapter import GeneratedAdapter
from generator.lora_layout import fused_projection_hint
from service.engine.errors import AdapterError
from service.engine.packed import PackedWeights

PEFT_PREFIX = "base_model.model."
SwapEvents = tuple[torch.cuda.Event, torch.cuda.Event]  # (start, done) of a slot copy on the copy stream
NO_SLOT = -1
_UNSET: object = object()  # "no activation yet", distinct from every slot tuple and from None


RECENT_ACTIVATIONS = 4  # as many as the decode groups a scheduler runs by default


@dataclass(frozen=True)
class _Activation:
    index: torch.Tensor
    scale: torch.Tensor
    uniform: int | None
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]]


class _ActiveRows:
    """What the current forward passes apply, shared by all slotted layers of one model.

    ``index``: [B] slot per row (the zero slot for rows without adapter), ``scale``: [B, 1, 1]; both None when no
    row has an adapter (the layers then cost nothing). ``uniform``: the slot when every row uses the same one (the
    layer then skips the gather). ``gathered``: each layer's A/B rows for this activation, gathered on first use and
    reused by every decode step until the batch changes.
    """

    __slots__ = ("gathered", "index", "scale", "split", "uniform")

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.uniform: int | None = None
        self.gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.split: _Split | None = None


@dataclass(frozen=True)
class _Split:
    """A fused pass (``fused.py``): the input is one flat sequence whose first ``rows`` tokens are the activated rows
    (one token each) and whose other tokens are one prefill chunk, with ``slot`` (None: no adapter) at ``scale``."""

    rows: int
    slot: int | None
    scale: torch.Tensor


class SlottedLoraLinear(nn.Linear):
    """``lora_A`` / ``lora_B`` are views into the bank's slot rows (not persistent: the state dict is unchanged)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __init__(
        self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: _ActiveRows, packing: PackedWeights
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("lora_A", lora_a, persistent=False)
        self.register_buffer("lora_B", lora_b, persistent=False)
        self._rows = rows
        self._packing = packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear, or oneDNN's packed weight when the engine packs (packed.py)
        return self.complete(x, self._packing.linear(self, x))

    def complete(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base projection of ``x``: this layer's own, or its slice of a fused projection, packed.py) plus
        the LoRA of each activated row."""
        split = self._rows.split
        if split is None:
            return self._add_lora(x, y)
        # a fused pass: [1, rows + k, in]; the rows' own slots on their tokens, the chunk's slot on the rest
        b = split.rows
        flat_x, flat_y = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        head = self._add_lora(flat_x[:b].view(b, 1, -1), flat_y[:b].view(b, 1, -1)).view(b, -1)
        tail = flat_y[b:]
        if split.slot is not None:
            chunk = flat_x[b:].to(self.lora_A.dtype)
            tail = tail + F.linear(F.linear(chunk, self.lora_A[split.slot]), self.lora_B[split.slot]) * split.scale
        return torch.cat([head, tail]).view(y.shape)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base projection of ``x``) plus each activated row's LoRA."""
        rows = self._rows
        if rows.index is None:
            return y
        assert rows.scale is not None
        x = x.to(self.lora_A.dtype)
        if rows.uniform is not None:
            # same op order as peft: base(x) + lora_B(lora_A(x)) * scaling
            delta = F.linear(F.linear(x, self.lora_A[rows.uniform]), self.lora_B[rows.uniform])
            return y + delta * rows.scale[0]
        batch = x.shape[0]
        if rows.index.shape[0] != batch:
            raise RuntimeError(f"LoRA rows were activated for {rows.index.shape[0]} rows, the batch has {batch}")
        low = self.lora_A.dtype
        fused = low == torch.float32
        # bf16/fp16 on the CPU: the two small bmms run 5-7x slower in the low dtype than in fp32 (AVX-512 BF16, 8 rows
        # of rank 8), so they run in fp32 on the low-precision values and round to the low dtype after each one:
        # the same roundings as a low-precision matmul that accumulates in fp32, which is what peft's Linears do
        upcast = not fused and x.device.type == "cpu"
        pair = rows.gathered.get(id(self))
        if pair is None:
            # once per batch composition: each row's A^T and B^T (times its scale when fused), contiguous for bmm
            a_t = self.lora_A.index_select(0, rows.index).transpose(1, 2).contiguous()  # [B, in, R]
            b = self.lora_B.index_select(0, rows.index)
            b_t = (b * rows.scale if fused else b).transpose(1, 2).contiguous()  # [B, R, out]
            pair = rows.gathered[id(self)] = (a_t.float(), b_t.float()) if upcast else (a_t, b_t)
        a_t, b_t = pair
        x = x.reshape(batch, -1, self.in_features)
        if fused:
            # y + h @ (sB)^T
            return torch.baddbmm(y.view(batch, -1, self.out_features), torch.bmm(x, a_t), b_t).view(y.shape)
        # bf16/fp16: peft's roundings (delta, then delta * scale, then the sum, each in the low dtype), so greedy
        # tokens stay with peft's; a fused y + h @ (sB)^T rounds once and drifts from it over a generation
        if upcast:
            h = torch.bmm(x.float(), a_t).to(low)  # [B, S, R]
            delta = torch.bmm(h.float(), b_t).to(low)
        else:
            delta = torch.bmm(torch.bmm(x, a_t), b_t)
        return y + (delta * rows.scale).view(y.shape)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the slots and laid out like a slot row (rank zero-padded), ready to be copied in.

    ``layout`` identifies the bank layout it was made for; another engine's layout refuses it.
    """

    adapter_id: str
    rank: int
    scaling: float
    row: torch.Tensor
    layout: str

    @property
    def nbytes(self) -> int:
        return self.row.nbytes


class LoraBank:
    """The slotted layers of one model, and the operations on their slots (prepare, load, clear, activate).

    The model must already be on its device: the slot buffers are created there, and moving the model afterwards
    would detach the layers' views from the bank.
    """

    def __init__(
        self,
        model: nn.Module,
        num_slots: int,
        max_rank: int,
        target_modules: Sequence[str],
        packing: PackedWeights | None = None,
    ) -> None:
        """``packing``: the model's packed weights, which the slotted layers' base projections use (none: plain)."""
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.target_modules = tuple(target_modules)
        self.zero_slot = num_slots
        self._rows = _ActiveRows()
        self._last_activation: object = _UNSET
        # the last few activations with their gathered A/B rows: decode groups take turns every step, and each would
        # otherwise gather its rows again (dropped whenever a slot's contents change)
        self._recent: OrderedDict[tuple[int, ...], _Activation] = OrderedDict()
        packing = packing or PackedWeights()  # none given: every base projection plain
        targets: list[tuple[str, nn.Linear]] = []
        for name, module in model.named_modules():
            if isinstance(module, SlottedLoraLinear):
                raise ValueError(f"{name} already has LoRA slots: one engine per model")
            if name.rsplit(".", 1)[-1] in self.target_modules and isinstance(module, nn.Linear):
                targets.append((name, module))
        found = {name.rsplit(".", 1)[-1] for name, _ in targets}
        missing = [t for t in self.target_modules if t not in found]
        if missing:
            hint = fused_projection_hint(model)
            raise ValueError(f"target modules {missing} are not Linear layers of this model{hint}")
        weight = targets[0][1].weight
        self.device = weight.device
        self.dtype = weight.dtype
        # offsets of each layer's A [R, in] and B [out, R] inside a slot row
        self._offsets: list[tuple[int, int, int]] = []
        offset = 0
        for _, linear in targets:
            self._offsets.append((offset, offset + max_rank * linear.in_features, linear.out_features))
            offset += max_rank * (linear.in_features + linear.out_features)
        self.slot_numel = offset
        self.slots = torch.zeros(num_slots + 1, offset, device=self.device, dtype=self.dtype)
        # on CUDA, prepared rows wait in pinned host memory and are copied on a side stream (the host never waits)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.scales = torch.zeros(num_slots + 1, device=self.device, dtype=self.dtype)
        self.layout = f"r{max_rank}:" + ";".join(f"{n}:{m.in_features}x{m.out_features}" for n, m in targets)
        self.names: list[str] = []
        self.layers: list[SlottedLoraLinear] = []
        self._originals: list[tuple[nn.Module, str, nn.Linear]] = []
        for (name, linear), (a_at, b_at, _) in zip(targets, self._offsets, strict=True):
            a_end = a_at + max_rank * linear.in_features
            b_end = b_at + max_rank * linear.out_features
            lora_a = self.slots[:, a_at:a_end].view(num_slots + 1, max_rank, linear.in_features)
            lora_b = self.slots[:, b_at:b_end].view(num_slots + 1, linear.out_features, max_rank)
            layer = SlottedLoraLinear(linear, lora_a, lora_b, self._rows, packing)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, layer)
            self._originals.append((parent, leaf, linear))
            self.names.append(name)
            self.layers.append(layer)

    def uninstall(self) -> None:
        """Put the original Linear modules back (the slots are dropped)."""
        for parent, leaf, original in self._originals:
            setattr(parent, leaf, original)
        self._originals.clear()
        self.layers.clear()
        self.names.clear()

    @property
    def slot_nbytes(self) -> int:
        """Memory of one slot over all layers."""
        return self.slot_numel * self.slots.element_size()

    # --- adapters ---------------------------------------------------------------------------------------------

    def prepare(self, adapter: GeneratedAdapter) -> PreparedAdapter:
        """Check the adapter against the slots and lay it out as a slot row; ``AdapterError`` says why it cannot be
        served. Costs about one swap's worth of copies, on the caller's thread."""
        settings = adapter.lora
        who = f"adapter {adapter.adapter_id!r}"
        if settings.rank > self.max_rank:
            raise AdapterError(f"{who} has LoRA rank {settings.rank}, the engine's slots hold rank <= {self.max_rank}")
        unknown = sorted(set(settings.target_modules) - set(self.target_modules))
        if unknown:
            raise AdapterError(
                f"{who} targets modules {unknown}; the engine's slots cover {list(self.target_modules)} only"
            )
        tensors = adapter.tensors
        r, big_r = settings.rank, self.max_rank
        pinned = self._copy_stream is not None
        row = torch.zeros(self.slot_numel, dtype=self.dtype, device="cpu" if pinned else self.device, pin_memory=pinned)
        used: set[str] = set()
        with torch.no_grad():
            for name, layer, (a_at, b_at, out) in zip(self.names, self.layers, self._offsets, strict=True):
                if name.rsplit(".", 1)[-1] not in settings.target_modules:
                    continue  # a subset of the targets: this layer's slice stays zero
                key_a = f"{PEFT_PREFIX}{name}.lora_A.weight"
                key_b = f"{PEFT_PREFIX}{name}.lora_B.weight"
                a = _tensor(tensors, key_a, (r, layer.in_features), who)
                b = _tensor(tensors, key_b, (out, r), who)
                row[a_at : a_at + big_r * layer.in_features].view(big_r, layer.in_features)[:r].copy_(a)
                row[b_at : b_at + big_r * out].view(out, big_r)[:, :r].copy_(b)
                used.update((key_a, key_b))
        extra = sorted(set(tensors) - used)
        if extra:
            raise AdapterError(f"{who} has tensors this model has no place for, e.g. {extra[:2]}")
        if not bool(torch.isfinite(row.abs().amax())):  # NaN and inf survive abs + max: one pass, not five
            raise AdapterError(f"{who} contains NaN or infinite values")
        return PreparedAdapter(adapter.adapter_id, r, float(settings.scaling), row, self.layout)

    def check(self, adapter: PreparedAdapter) -> None:
        if adapter.layout != self.layout or adapter.row.shape != (self.slot_numel,):
            raise AdapterError(f"adapter {adapter.adapter_id!r} was prepared for another engine layout")

    def load(self, slot: int, adapter: PreparedAdapter) -> SwapEvents | None:
        """Copy the adapter into ``slot``: one in-place copy of a contiguous row.

        On CUDA the copy is issued from pinned memory on a side stream, after the work already queued (which may
        still read the evicted slot); the compute stream waits for it on the device, the host does not. The copy's
        (start, done) CUDA events are returned for timing; on the CPU the copy is done on return (None)."""
        self._check_slot(slot)
        self.check(adapter)
        self._forget_activations()
        stream = self._copy_stream
        with torch.no_grad():
            if stream is None:
                self.slots[slot].copy_(adapter.row)
                self.scales[slot] = adapter.scaling
                return None
            compute = torch.cuda.current_stream(self.device)
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                start.record(stream)
                self.slots[slot].copy_(adapter.row, non_blocking=True)
                self.scales[slot].fill_(adapter.scaling)
                done.record(stream)
            compute.wait_event(done)
        return start, done

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            self.slots[slot].zero_()
            self.scales[slot] = 0.0
        self._forget_activations()

    def _forget_activations(self) -> None:
        self._last_activation = _UNSET
        self._recent.clear()

    def activate(self, slots: Sequence[int] | None) -> None:
        """Set the slot of each row for the next forward passes (``NO_SLOT``: no adapter; None: no row has one)."""
        key = None if slots is None or all(s == NO_SLOT for s in slots) else tuple(slots)
        if key == self._last_activation:
            return
        self._last_activation = key
        rows = self._rows
        if key is None:
            rows.gathered = {}
            rows.index = rows.scale = None
            rows.uniform = None
            return
        active = self._recent.get(key)
        if active is None:
            for s in key:
                if s != NO_SLOT:
                    self._check_slot(s)
            values = [self.zero_slot if s == NO_SLOT else s for s in key]
            index = torch.tensor(values).to(self.device, non_blocking=True)  # no host wait on CUDA
            scale = self.scales.index_select(0, index).view(-1, 1, 1)
            active = _Activation(index, scale, key[0] if len(set(key)) == 1 else None, {})
            self._recent[key] = active
            while len(self._recent) > RECENT_ACTIVATIONS:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        rows.index, rows.scale, rows.uniform = active.index, active.scale, active.uniform
        rows.gathered = active.gathered

    def activate_split(self, rows: int, slot: int | None) -> None:
        """For the next forward passes (until ``end_split``): fused passes whose first ``rows`` tokens are the rows of
        the current activation and whose other tokens are a prefill chunk with ``slot`` (``NO_SLOT``/None: none)."""
        if slot is not None and slot != NO_SLOT:
            self._check_slot(slot)
            self._rows.split = _Split(rows, slot, self.scales[slot])
        else:
            self._rows.split = _Split(rows, None, self.scales[self.zero_slot])

    def end_split(self) -> None:
        self._rows.split = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.num_slots - 1}")


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, int], who: str) -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise AdapterError(f"{who} lacks the tensor {key}")
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"{who}: {key} has shape {tuple(tensor.shape)}, this model needs {shape}")
    if not tensor.is_floating_point():
        raise AdapterError(f"{who}: {key} is {tensor.dtype}, not a floating-point tensor")
    return tensor
