"""Weight quantization of a flattened layer: the per-tensor scale (max or MSE clip) and the joint
rounding of the copies of a flattened channel (our one change beyond the paper, see quantize_weight)."""

from __future__ import annotations

import torch

from fq_compile.kernels.flatten_quantize import QMAX
from fq_compile.kernels.packing import pack_int4
from fq_compile.plan import ChannelMap


def weight_scale(w: torch.Tensor, qmax: int, method: str) -> float:
    """Per-tensor weight scale: max/qmax, or the clip ratio r in [0.5, 1] (scale r*max/qmax) that
    minimises ||W - Q(W)||^2: a grid of step 0.05, then step 0.01 around its best."""
    top = float(w.abs().max())
    if top == 0:
        return 1.0
    if method == "max":
        return top / qmax
    a = w.detach().abs().flatten().float()

    def err(r):
        s = top * r / qmax
        return float(torch.round(a / s).clamp_(max=qmax).mul_(s).sub_(a).pow_(2).sum())

    coarse = min(torch.linspace(1.0, 0.5, 11).tolist(), key=err)
    fine = [r for r in torch.linspace(coarse - 0.04, coarse + 0.04, 9).tolist() if 0.5 - 1e-9 <= r <= 1.0 + 1e-9]
    return top * min(fine, key=err) / qmax


def quantize_weight(w: torch.Tensor, scale: float, bits: int, cmap: ChannelMap | None = None) -> torch.Tensor:
    """Round the flattened weight W' [N, K'] to integers at the per-tensor scale.

    Positions that read the same input channel (the E_j copies of Eq. 4, weight splits) are
    rounded jointly: along the order in which the activation fills them (slice 0, 1, ..., then the
    remainder), every prefix of their integer sum is the rounded prefix of their float sum.  Since
    the active slices of a value always form such a prefix, the channel's weight error is at most
    half a step whatever its magnitude, instead of E_j half-steps: for a 100x outlier channel the
    rounding error of its weight no longer gets multiplied by its activation.  Plain rounding is the
    special case of a channel with one position."""
    qmax = QMAX[bits]
    v = w.double() / scale
    if cmap is None:
        q = torch.round(v)
    else:
        src = torch.where(cmap.active, cmap.src.long(), torch.full_like(cmap.src.long(), -1))
        pos = torch.arange(src.numel())
        perm = torch.argsort(cmap.lo, stable=True)                    # fill order within a channel ...
        perm = perm[torch.argsort(src[perm], stable=True)]             # ... grouped by channel
        vs, gs = v[:, perm], src[perm]
        csum = torch.cumsum(vs, dim=1)
        first = torch.ones_like(gs, dtype=torch.bool)
        first[1:] = gs[1:] != gs[:-1]
        start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
        before = torch.where(start > 0, csum[:, (start - 1).clamp_min(0)], torch.zeros_like(csum))
        prefix = torch.round(csum - before)
        shifted = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], 1)
        prev = torch.where(first, torch.zeros_like(prefix), shifted)
        qs = prefix - prev
        q = torch.empty_like(qs)
        q[:, perm] = qs
    q = q.clamp(-qmax, qmax).to(torch.int8)
    return pack_int4(q) if bits == 4 else q
