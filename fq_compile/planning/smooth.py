"""Smoothing scales s (Eq. 5, and SmoothQuant's for the baseline level): X diag(s)^-1, diag(s) W.

FlattenQuant's Eq. 5 normalises each tensor's per-channel maxima before migrating difficulty:

    s_j = sigmoid((max|X_j| - mu_X) / sigma_X) ** alpha / sigmoid((max|W_j| - mu_W) / sigma_W) ** (1 - alpha)

The paper defines mu and sigma (the mean and the population standard deviation of the channel
maxima) only for X, then writes the same symbols in the weight term.  Using the activation's mu and
sigma for the weights would compare weight maxima (~0.1) with activation statistics (~1-100) and
make the weight factor a constant, so we normalise each tensor by its own statistics; the text's
"relative numerical magnitude within the tensor" supports this reading.  Sigmoids lie in (0, 1),
so s stays within a narrow band: Eq. 5 is a gentle smoothing and flattening does the heavy lifting.
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def sigmoid_smoothing(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5.  act_max, weight_max: per input channel max |X_j|, max |W_j| (float, [C])."""
    a = act_max.double()
    w = weight_max.double()
    za = (a - a.mean()) / a.std(unbiased=False).clamp_min(_EPS)
    zw = (w - w.mean()) / w.std(unbiased=False).clamp_min(_EPS)
    s = torch.sigmoid(za) ** alpha / torch.sigmoid(zw) ** (1.0 - alpha)
    return s.float()


def smoothquant_smoothing(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

    Dead channels (max 0 on either side) keep s = 1 so that no scale becomes 0 or inf."""
    a = act_max.double()
    w = weight_max.double()
    s = a.clamp_min(_EPS) ** alpha / w.clamp_min(_EPS) ** (1.0 - alpha)
    dead = (a <= _EPS) | (w <= _EPS)
    return torch.where(dead, torch.ones_like(s), s).float()


def smoothing_scales(method: str, act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    if method == "none":
        return torch.ones_like(act_max, dtype=torch.float32)
    if method == "sigmoid":
        return sigmoid_smoothing(act_max, weight_max, alpha)
    if method == "smoothquant":
        return smoothquant_smoothing(act_max, weight_max, alpha)
    raise ValueError(f"unknown smoothing method {method!r}")
