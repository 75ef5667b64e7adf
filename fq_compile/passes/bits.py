"""Per-layer bit width (Eq. 8): INT4 when KL(P, Q_INT4) / KL(P, Q_INT8) < gamma, else INT8.

The paper follows TensorRT's entropy calibration without saying what P is.  Our reading: P is the
histogram of |v| for the tensor exactly as it will be quantized (the flattened, smoothed activation
on calibration rows; the flattened weight), over [0, max] in `bins` bins.  Q_k is TensorRT's
candidate distribution for k bits: the histogram merged into the quantization levels of the
per-tensor scale the layer really uses (level i collects the bins whose centres round to i) and
spread back uniformly over the non-empty bins of each level.  KL(P, Q_k) is thus the information
the k-bit grid destroys in the tensor's distribution; both activations and weights must pass
(the layer's ratio is the larger of the two), because the paper requires both in INT4.
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


def choose_bits(act_ratio: float, weight_ratio: float, gamma: float) -> int:
    """Eq. 8 for a layer: INT4 only when both its activation and its weight pass."""
    return 4 if max(act_ratio, weight_ratio) < gamma else 8
