"""INT4 storage: two signed 4-bit values per byte.

Hopper has no INT4 tensor cores, so INT4 only pays through bytes: weights (and activations) are
stored packed and unpacked to INT8 (or FP8, where int4 values are exact) right before the multiply.
Layout (shared by every kernel): element 2i in the low nibble, element 2i+1 in the high nibble,
each nibble two's complement; the packed tensor is uint8 with the last dimension halved.
"""

from __future__ import annotations

import torch

INT4_MAX = 7  # symmetric range [-7, 7]; -8 is never produced


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with last dim halved."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    u = q.to(torch.int16) & 0xF
    lo, hi = u[..., 0::2], u[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 packed -> int8 values with the last dim doubled (sign-extended nibbles)."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {p.dtype}")
    v = p.to(torch.int16)
    lo = v & 0xF
    hi = (v >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return out.to(torch.int8)
