"""The flatten plan (Eq. 2-4) and the channel map that both the activation op and the weights use.

Eq. 2: channel j with smoothed maximum m_j gets E_j = floor(m_j / T) extra channels.  Eq. 3 fills
them greedily: the extra channels carry T, ..., T and the original channel keeps the remainder
(X mod T), signs kept.  Eq. 4 repeats the weight column of channel j once per extra channel, so the
product is unchanged before quantization.  The flattened count is padded with zero channels to a
multiple of 32 (paper 5.1) so that GEMM tiles (and INT4 byte packing) align.

Weight flattening (paper 4.1, last paragraph, which gives no formula): we split a weight column
whose max exceeds the weight threshold into D_j + 1 equal parts and repeat the activation channel
D_j times, exactly (lo = 0, hi = inf).  Equal parts are the exact inverse of repeating the
activation and lower the column max by D_j + 1.  Only channels that are not activation-flattened
are split: splitting both sides of one channel would need E_j * D_j cross terms.

Layout of the K' positions: [0, C) the original channels (unflattened, or the remainder of a
flattened one), then each channel's extra positions in channel order, then weight-split copies,
then zero padding.  `lo` and `hi` are in units of T (the op multiplies them by qmax).
"""

from __future__ import annotations

import torch

from fq_compile.plan import ChannelMap

INF = float("inf")


def extra_channels(channel_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 2: E_j = floor(max|X_j| / T) (int64, [C])."""
    return torch.floor(channel_max.double() / threshold).clamp_min(0).to(torch.int64)


def channel_map(extra: torch.Tensor, weight_dup: torch.Tensor | None, pad_multiple: int) -> ChannelMap:
    """Build the position table from E (activation extras) and D (weight splits) per channel."""
    c = extra.numel()
    extra = extra.to(torch.int64)
    dup = torch.zeros_like(extra) if weight_dup is None else weight_dup.to(torch.int64)
    if bool(((extra > 0) & (dup > 0)).any()):
        raise ValueError("a channel cannot be flattened in both the activation and the weight")
    src = [torch.arange(c)]
    lo = [extra.double()]                       # the remainder starts after E full slices
    hi = [torch.full((c,), INF, dtype=torch.float64)]
    wf = [1.0 / (dup.double() + 1.0)]
    # extra activation slices: channel j contributes slices i = 0..E_j-1 with lo = i, hi = 1
    rep = torch.repeat_interleave(torch.arange(c), extra)
    if rep.numel():
        starts = torch.cumsum(extra, 0) - extra
        slice_idx = torch.arange(rep.numel()) - torch.repeat_interleave(starts, extra)
        src.append(rep)
        lo.append(slice_idx.double())
        hi.append(torch.ones(rep.numel(), dtype=torch.float64))
        wf.append(torch.ones(rep.numel(), dtype=torch.float64))
    drep = torch.repeat_interleave(torch.arange(c), dup)
    if drep.numel():
        src.append(drep)
        lo.append(torch.zeros(drep.numel(), dtype=torch.float64))
        hi.append(torch.full((drep.numel(),), INF, dtype=torch.float64))
        wf.append(1.0 / (dup[drep].double() + 1.0))
    n = sum(t.numel() for t in src)
    cmap = ChannelMap(torch.cat(src).to(torch.int32), torch.cat(lo).float(), torch.cat(hi).float(),
                      torch.cat(wf).float(), torch.ones(n, dtype=torch.bool))
    return cmap.padded_to(n + (-n) % pad_multiple)


def flatten_values(x: torch.Tensor, cmap: ChannelMap, threshold: float) -> torch.Tensor:
    """Eq. 3 in floating point (no quantization): [..., C] -> [..., K'].  Used for statistics
    (Eq. 8 histograms, GPTQ Hessians) and as the float model of what the op quantizes."""
    g = x.index_select(-1, cmap.src.to(torch.int64).to(x.device)).float()
    a = g.abs() / threshold
    v = torch.minimum((a - cmap.lo.to(x.device)).clamp_min(0.0), cmap.hi.to(x.device)) * threshold
    v = torch.where(cmap.active.to(x.device), v, torch.zeros_like(v))
    return torch.where(g < 0, -v, v)


def flatten_weight(weight: torch.Tensor, cmap: ChannelMap) -> torch.Tensor:
    """Eq. 4 (+ weight splits): W [N, C] -> W' [N, K'] with x' W'^T == x W^T before quantization."""
    w = weight.index_select(1, cmap.src.to(torch.int64).to(weight.device)).float()
    return w * cmap.weight_factor.to(weight.device)


def weight_splits(column_max: torch.Tensor, threshold: float, blocked: torch.Tensor) -> torch.Tensor:
    """D_j for weight flattening: same rule as Eq. 2 on weight column maxima, 0 where blocked."""
    d = extra_channels(column_max, threshold)
    return torch.where(blocked, torch.zeros_like(d), d)
