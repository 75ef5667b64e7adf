"""Per-layer bit width (Eq. 8): INT4 when KL(P, Q_INT4) / KL(P, Q_INT8) < gamma, else INT8.

The paper follows TensorRT's entropy calibration without saying what P is.  Our reading: P is the
histogram of |v| for the tensor exactly as it will be quantized (the flattened, smoothed activation
on calibration rows; the flattened weight), over [0, max] in `bins` bins.  Q_k is TensorRT's
candidate distribution for k bits: the histogram merged into the quantization levels of the
per-tensor scale the layer really uses (level i collects the bins whose centres round to i) and
spread back uniformly over the non-empty bins of each level.  KL(P, Q_k) is thus the information
the k-bit grid destroys in the tensor's distribution; both activations and weights must pass
(the layer's ratio is the larger of the two), because the paper requires both in INT4.
This is `Config.kl_method="fixed"`.

`kl_method="tensorrt"` (the default) reads "akin to TensorRT" literally: TensorRT's entropy calibration scores
a bit width by the *smallest* KL over candidate clip thresholds (the reference P keeps bins below
the threshold with the clipped mass added to its last bin; Q merges those bins into 2^(k-1)
equal-width levels, 128 for INT8 and 8 for INT4, and spreads each level's mass over its non-empty
bins), so KL4/KL8 compares the best each grid can do.  Only the decision changes: the layer is
still quantized at the flattened tensor's own scale (T for activations, max or MSE clip for
weights), which flattening has already made tight.  Why it is the default: the paper's gamma only makes
sense if layer ratios cluster near its gamma (its Table 10 moves a quarter of the layers between INT4
and INT8 over a small gamma range); on a real model's calibration data the TensorRT reading's ratios
do, the fixed reading's lie above every gamma the paper tries (the distributions:
benchmarks/results/accuracy-smollm2-135m-select-cpu.md).
"""

from __future__ import annotations

import math

import torch


def kl_quantized(values: torch.Tensor, scale: float, qmax: int, bins: int) -> float:
    """KL(P, Q) of |values| against its k-bit (qmax) quantization with the given per-tensor scale."""
    a = values.detach().abs().flatten().double()
    top = float(a.max()) if a.numel() else 0.0
    if top <= 0:
        return 0.0
    hist = torch.histc(a, bins=bins, min=0.0, max=top)
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * (top / bins)
    level = torch.round(centres / scale).clamp(max=qmax).to(torch.int64)
    nonzero = (p > 0).double()
    mass = torch.zeros(qmax + 1, dtype=torch.float64).index_add_(0, level, p)
    count = torch.zeros(qmax + 1, dtype=torch.float64).index_add_(0, level, nonzero)
    q = torch.where(p > 0, mass[level] / count[level].clamp_min(1.0), torch.zeros_like(p))
    m = p > 0
    return float((p[m] * torch.log(p[m] / q[m])).sum())


def kl_ratio(values: torch.Tensor, max_value: float, bins: int) -> float:
    """KL(P, Q_INT4) / KL(P, Q_INT8) with the per-tensor scales max/7 and max/127."""
    k4 = kl_quantized(values, max_value / 7.0, 7, bins)
    k8 = kl_quantized(values, max_value / 127.0, 127, bins)
    if k8 <= 0.0:
        return 1.0 if k4 <= 0.0 else math.inf
    return k4 / k8


def kl_tensorrt(values: torch.Tensor, levels: int, bins: int, candidates: int = 128) -> float:
    """min over clip thresholds of KL(P_clip, Q) with `levels` magnitude levels (TensorRT's
    entropy calibration; its INT8 case is levels = 128).  `candidates` thresholds are tried,
    evenly spaced from all bins (always tried) down to `levels` bins."""
    a = values.detach().abs().flatten().double()
    top = float(a.max()) if a.numel() else 0.0
    if top <= 0:
        return 0.0
    hist = torch.histc(a, bins=bins, min=0.0, max=top)
    best = math.inf
    for i in sorted(set(torch.linspace(bins, levels, min(candidates, bins - levels + 1)).round().long().tolist())):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        nz = p > 0
        chunk = (torch.arange(i) // (i // levels)).clamp(max=levels - 1)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nz.double())
        q = torch.where(nz, mass[chunk] / count[chunk].clamp_min(1.0), torch.zeros_like(p))
        p, q = p / p.sum(), q / q.sum().clamp_min(1e-300)
        q = torch.where(nz & (q <= 0), torch.full_like(q, 1e-12), q)     # clipped mass in an empty level
        best = min(best, float((p[nz] * torch.log(p[nz] / q[nz])).sum()))
    return best


def kl_ratio_tensorrt(values: torch.Tensor, bins: int) -> float:
    """KL4/KL8 with each KL at its own best clip threshold (see kl_tensorrt)."""
    k4 = kl_tensorrt(values, 8, bins)
    k8 = kl_tensorrt(values, 128, bins)
    if k8 <= 0.0:
        return 1.0 if k4 <= 0.0 else math.inf
    return k4 / k8


def tensor_ratio(values: torch.Tensor, max_value: float, bins: int, method: str) -> float:
    """Eq. 8's ratio for one tensor under the reading `method` ("fixed" or "tensorrt")."""
    if method == "fixed":
        return kl_ratio(values, max_value, bins)
    if method == "tensorrt":
        return kl_ratio_tensorrt(values, bins)
    raise ValueError(f"unknown KL method {method!r}")


def choose_bits(act_ratio: float, weight_ratio: float, gamma: float) -> int:
    """Eq. 8 for a layer: INT4 only when both its activation and its weight pass."""
    return 4 if max(act_ratio, weight_ratio) < gamma else 8
