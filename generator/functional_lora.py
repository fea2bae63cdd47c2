"""LoRA weights given as tensors per forward pass, with gradients flowing back into whatever produced them.

End-to-end training of the generator needs "the base model with the LoRA that the generator just produced", for
several tasks in one batch, differentiably. ``FunctionalLora`` wraps the target Linears once; inside
``with lora.applied(vectors, rows):`` batch row ``i`` runs with the LoRA ``vectors[rows[i]]`` (flat, in the layout's
order). Same arithmetic as peft: ``base(x) + scaling * B(A(x))``. ``remove()`` gives the plain Linears back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from generator.batching import IGNORE_INDEX
from generator.lora_layout import LoraLayout


class _RowLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.a: torch.Tensor | None = None  # [rows, r, in]
        self.b: torch.Tensor | None = None  # [rows, out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.a is None or self.b is None:
            return y
        # the LoRA in its own dtype (fp32 from the CVAE) on a bf16/fp16 model, as peft does; no-op casts in fp32
        h = torch.einsum("bsi,bri->bsr", x.to(self.a.dtype), self.a)
        return y + (self.scaling * torch.einsum("bsr,bor->bso", h, self.b)).to(y.dtype)


class FunctionalLora:
    def __init__(self, model: nn.Module, layout: LoraLayout) -> None:
        self.model = model
        self.layout = layout
        self._layers: list[tuple[_RowLoraLinear, int, int]] = []  # (wrapper, A segment index, B segment index)
        by_key = {s.key: i for i, s in enumerate(layout.segments)}
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in layout.settings.target_modules or not isinstance(module, nn.Linear):
                continue
            prefix = f"base_model.model.{name}"
            a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
            if a_key not in by_key or b_key not in by_key:
                continue
            wrapper = _RowLoraLinear(module, layout.settings.scaling)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, wrapper)
            self._layers.append((wrapper, by_key[a_key], by_key[b_key]))
        if len(self._layers) * 2 != len(layout.segments):
            self.remove()
            raise ValueError("the model's target modules do not match the LoRA layout")

    @contextmanager
    def applied(self, vectors: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
        """``vectors`` [T, D] flat LoRAs; ``rows`` [N] which of them each batch row uses."""
        segments = self.layout.segments
        for wrapper, ia, ib in self._layers:
            sa, sb = segments[ia], segments[ib]
            a = vectors[:, sa.offset : sa.end].reshape(-1, *sa.shape)
            b = vectors[:, sb.offset : sb.end].reshape(-1, *sb.shape)
            wrapper.a, wrapper.b = a.index_select(0, rows), b.index_select(0, rows)
        try:
            yield
        finally:
            for wrapper, _, _ in self._layers:
                wrapper.a = wrapper.b = None

    def remove(self) -> None:
        for name, module in list(self.model.named_modules()):
            if isinstance(module, _RowLoraLinear):
                parent = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
                setattr(parent, name.rsplit(".", 1)[-1], module.base)
        self._layers = []


def answer_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens (``IGNORE_INDEX`` elsewhere) of a causal LM."""
    return _token_losses(model, input_ids, attention_mask, labels)[0].mean()


def answer_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
) -> torch.Tensor:
    """``[num_groups]``: the mean cross-entropy over the label tokens of the rows in each group (``groups`` [B])."""
    losses, rows = _token_losses(model, input_ids, attention_mask, labels)
    token_groups = groups[rows]
    total = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(0, token_groups, losses)
    count = torch.bincount(token_groups, minlength=num_groups).clamp_min(1)
    return total / count


def _token_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of every label token, and the batch row of each.

    The output head runs only at the positions that predict a label token: with a large vocabulary most of a full
    logits tensor would be thrown away (and its backward pass paid for)."""
    decoder: nn.Module = model.get_decoder()  # type: ignore[operator]
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), rows
