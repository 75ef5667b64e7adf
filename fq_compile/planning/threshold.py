"""Truncation threshold T (Eq. 6-7): boxplot-clip the per-channel maxima, then T = beta * mean.

Eq. 6 clips the channel maxima to [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (Frigge et al.'s boxplot fences) so
that a handful of outlier channels cannot drag the mean up; Eq. 7 scales the mean by beta.
Quartiles use linear interpolation (torch.quantile's default, numpy's too).
"""

from __future__ import annotations

import torch


def boxplot_clip(channel_max: torch.Tensor) -> torch.Tensor:
    """Eq. 6 on a 1-D tensor of channel maxima."""
    v = channel_max.double()
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64))
    iqr = q3 - q1
    return v.clamp(min=float(q1 - 1.5 * iqr), max=float(q3 + 1.5 * iqr))


def truncation_threshold(channel_max: torch.Tensor, beta: float, outlier_clip: bool = True) -> float:
    """Eq. 7: T = beta * mean(clipped channel maxima).  Never above the largest maximum (no point)."""
    v = boxplot_clip(channel_max) if outlier_clip else channel_max.double()
    t = beta * float(v.mean())
    top = float(channel_max.max())
    if not (t > 0):
        raise ValueError("truncation threshold is not positive: every observed channel is zero")
    return min(t, top)
