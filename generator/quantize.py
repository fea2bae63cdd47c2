"""Group-wise symmetric round-to-nearest quantisation for the generator's shipping form.

``icm-lora export-generator --weights int8|int4`` stores each large decoder matrix as integers plus one fp16 scale per
``group`` consecutive values (the matrix flattened row-major, the last group zero-padded): ``value ≈ q * scale`` with
``scale = max|group| / qmax`` (qmax 127 for int8, 7 for int4; a group of zeros keeps scale 0 and decodes to exact
zeros). int4 values are stored two per byte (``q + 8`` in each nibble, the even index in the low nibble). Loading
dequantises to fp32 once; generation never sees integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WEIGHT_FORMATS = ("float16", "int8", "int4")
GROUP = 64


@dataclass(frozen=True)
class Quantized:
    data: torch.Tensor  # int8 [padded numel] (int8) or uint8 [padded numel / 2] (int4)
    scale: torch.Tensor  # fp16 [groups]


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"unsupported quantisation: {bits} bits (4 or 8)")
    return 2 ** (bits - 1) - 1


def quantize(tensor: torch.Tensor, bits: int, group: int = GROUP) -> Quantized:
    limit = qmax(bits)
    flat = tensor.detach().float().reshape(-1)
    groups = math.ceil(flat.numel() / group)
    padded = torch.zeros(groups * group)
    padded[: flat.numel()] = flat
    blocks = padded.view(groups, group)
    scale = (blocks.abs().amax(dim=1) / limit).to(torch.float16)
    # divide by the scale as stored, so that decoding (q * fp16 scale) is the nearest grid point to the value
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.clamp(torch.round(blocks / safe[:, None]), -limit, limit).to(torch.int8).reshape(-1)
    if bits == 8:
        return Quantized(q, scale)
    nibbles = (q + 8).to(torch.uint8).view(-1, 2)
    return Quantized(nibbles[:, 0] | (nibbles[:, 1] << 4), scale)


def dequantize(quantized: Quantized, shape: tuple[int, ...], bits: int, group: int = GROUP) -> torch.Tensor:
    """fp32 values of ``shape``; ``ValueError`` when the stored sizes do not fit it."""
    qmax(bits)
    numel = math.prod(shape)
    groups = math.ceil(numel / group)
    data, scale = quantized.data, quantized.scale
    if bits == 8:
        if data.dtype != torch.int8 or data.numel() != groups * group:
            raise ValueError(f"int8 data of {data.numel()} {data.dtype} values does not fit {list(shape)}")
        q = data.float()
    else:
        if data.dtype != torch.uint8 or data.numel() * 2 != groups * group:
            raise ValueError(f"int4 data of {data.numel()} {data.dtype} bytes does not fit {list(shape)}")
        q = torch.stack([(data & 0x0F), (data >> 4)], dim=1).reshape(-1).to(torch.int16).float() - 8.0
    if scale.numel() != groups:
        raise ValueError(f"{scale.numel()} scales for {groups} groups of {list(shape)}")
    values = q.view(groups, group) * scale.float()[:, None]
    return values.reshape(-1)[:numel].reshape(shape).contiguous()


def nbytes(quantized: Quantized) -> int:
    return quantized.data.numel() * quantized.data.element_size() + quantized.scale.numel() * 2
