"""Weight quantization of a layer: the float weight the GEMM approximates (smoothed, row-folded,
flattened), the scales (per tensor or per output channel; max or MSE clip), the joint rounding of
the copies of a flattened channel (our one change beyond the paper, see quantize_weight), and the
e4m3 rounding of the FP8 format."""

from __future__ import annotations

import torch

from fq_compile.kernels.flatten_quantize import QMAX
from fq_compile.kernels.fp8 import E4M3_MAX, round_e4m3
from fq_compile.kernels.packing import pack_int4
from fq_compile.plan import ChannelMap, GroupPlan
from fq_compile.planning.flatten import flatten_weight


def smoothed_weight(weight: torch.Tensor, group: GroupPlan, row_scale: torch.Tensor | None) -> torch.Tensor:
    """diag(s) W with the rows divided by the scales of a group folded into this layer's output: the
    float weight of an unflattened (FP8-format) layer."""
    w = weight.float() * group.smooth[None, :]
    if row_scale is not None:
        w = w / row_scale[:, None]
    return w


def flattened_weight(weight: torch.Tensor, group: GroupPlan, row_scale: torch.Tensor | None) -> torch.Tensor:
    """The float weight the integer GEMM approximates: smoothed, row-folded, flattened (Eq. 4)."""
    return flatten_weight(smoothed_weight(weight, group, row_scale), group.cmap)


def quantize_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 weights [N, K] at the weight scales float32 [N] (w / scale computed in float64, rounded to
    float32, then to e4m3: the scale is max / 448, so nothing saturates unless a clip asks for it)."""
    return round_e4m3((w.double() / scale.double().reshape(-1, 1)).float())


def fp8_weight_scale(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """max|W| / 448 per tensor or per output channel, float32 [N] (e4m3 keeps relative precision, so
    the max is the natural clip)."""
    return weight_scale(w, int(E4M3_MAX), "max", granularity)


def weight_scale(w: torch.Tensor, qmax: int, method: str, granularity: str = "tensor") -> torch.Tensor:
    """Weight scales, float32 [N] (one per output channel; all equal when granularity="tensor").

    method "max": max|W| / qmax over the tensor or each row.  "mse": the clip ratio r in [0.5, 1]
    (scale r * max / qmax) that minimises ||W - Q(W)||^2 over the tensor or each row: a grid of step
    0.05, then step 0.01 around the best.  A per-channel scale costs nothing in the integer GEMM (the
    epilogue multiplies by a vector instead of a number) and fits each row's own range, while the
    activation side stays per tensor."""
    a = w.detach().abs().float()
    rows = a.shape[0]
    if granularity == "tensor":
        a = a.reshape(1, -1)
    elif granularity != "channel":
        raise ValueError(f"weight scale granularity must be 'tensor' or 'channel', got {granularity!r}")
    top = a.amax(dim=1)                                          # [1] or [N]
    if method == "max":
        best = torch.ones_like(top)
    elif method == "mse":
        best = _mse_ratio(a, top, qmax)
    else:
        raise ValueError(f"weight clip method must be 'max' or 'mse', got {method!r}")
    scale = torch.where(top > 0, top.double() * best.double() / qmax, torch.ones_like(top, dtype=torch.float64))
    return scale.float().expand(rows).contiguous() if granularity == "tensor" else scale.float()


def _mse_ratio(a: torch.Tensor, top: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row of |W| (a [R, K], row maxima top [R]): the clip ratio with the least squared error."""
    def err(r: torch.Tensor) -> torch.Tensor:                      # r [R] -> squared error [R]
        s = (top * r / qmax).clamp_min(1e-30)[:, None]
        return torch.round(a / s).clamp_(max=qmax).mul_(s).sub_(a).pow_(2).sum(dim=1)

    def search(grid: torch.Tensor) -> torch.Tensor:                # grid [G, R] -> best ratio [R]
        errs = torch.stack([err(g) for g in grid])
        return grid.gather(0, errs.argmin(dim=0, keepdim=True))[0]

    coarse = search(torch.linspace(1.0, 0.5, 11)[:, None].expand(11, a.shape[0]))
    fine = (coarse[None, :] + torch.linspace(-0.04, 0.04, 9)[:, None]).clamp(0.5, 1.0)
    return search(fine)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, cmap: ChannelMap | None = None) -> torch.Tensor:
    """Round the flattened weight W' [N, K'] to integers at the weight scales (float [N], or a number).

    Positions that read the same input channel (the E_j copies of Eq. 4, weight splits) are
    rounded jointly: along the order in which the activation fills them (slice 0, 1, ..., then the
    remainder), every prefix of their integer sum is the rounded prefix of their float sum.  Since
    the active slices of a value always form such a prefix, the channel's weight error is at most
    half a step whatever its magnitude, instead of E_j half-steps: for a 100x outlier channel the
    rounding error of its weight no longer gets multiplied by its activation.  Plain rounding is the
    special case of a channel with one position."""
    qmax = QMAX[bits]
    v = w.double() / (scale.double().reshape(-1, 1) if isinstance(scale, torch.Tensor) else scale)
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
