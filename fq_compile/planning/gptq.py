"""GPTQ (Frantar et al., 2022) with fixed weight scales, on the flattened weights (paper 5.1, O3).

The columns of the flattened weight W' [N, K'] are quantized one at a time, in blocks, with the fixed
scales of the layer (one per tensor, as the paper, or one per output channel: each row keeps its own
scale, which GPTQ's column-by-column update does not care about); each column's rounding error is spread
over the columns not yet quantized through the inverse Hessian of the layer's input, H = 2 X'^T X' / n,
where X' is the *flattened, smoothed* activation the integer GEMM really sees. Repeated columns of a
flattened channel have almost identical activations, so GPTQ compensates one copy's error in the next:
it would push compensation into the copies that fire only for the largest values (slice i is active only
where |x| > i*T).  Those columns have tiny Hessian diagonals, so GPTQ would park large errors in them,
which calibration rows barely see and new inputs do.  We therefore fix the extra and split columns
first, with the planner's joint rounding, let their error flow into the original columns, and run GPTQ
over the original columns only (`fixed` below)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running X'^T X' over calibration rows (float64 for stable sums of many rows)."""

    def __init__(self, k: int, device="cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, xf: torch.Tensor) -> None:
        x = xf.reshape(-1, xf.shape[-1]).to(self.h.device, torch.float64)
        self.h.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no rows were accumulated for this Hessian")
        return 2.0 * self.h / self.rows


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale, qmax: int, block_size: int = 128,
                  damp: float = 0.01, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Integer weights [N, K'] (int8 values in [-qmax, qmax]) for W' [N, K'] under Hessian H [K', K'].

    fixed: optional [N, K'] integers that every column keeps (their errors still propagate); only
    gptq_quantize_flattened uses it, for a leading subset of columns."""
    return _gptq(w, h, scale, qmax, block_size, damp, fixed, None)


def gptq_quantize_flattened(w: torch.Tensor, h: torch.Tensor, scale, qmax: int, rtn: torch.Tensor,
                            original: torch.Tensor, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ on a flattened weight: columns where `original` is False (extra slices, weight splits,
    padding) keep `rtn` (the joint rounding) and are taken first; GPTQ runs on the rest."""
    order = torch.cat([torch.nonzero(~original).flatten(), torch.nonzero(original).flatten()])
    n_fixed = int((~original).sum())
    q = _gptq(w[:, order], h[order][:, order], scale, qmax, block_size, damp, rtn[:, order], n_fixed)
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def _gptq(w, h, scale, qmax, block_size, damp, fixed, n_fixed):
    """scale: a number or a float tensor [N] (per output row)."""
    w = w.detach().to(torch.float64).clone()
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=w.device, dtype=torch.float64).reshape(-1)
    h = h.detach().to(torch.float64).clone()
    k = w.shape[1]
    n_fixed = 0 if fixed is None else (k if n_fixed is None else n_fixed)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            if i1 + i < n_fixed:
                qc = fixed[:, i1 + i].to(col.dtype)
            else:
                qc = torch.round(col / scale).clamp(-qmax, qmax)
            q1[:, i] = qc
            e = (col - qc * scale) / hb[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err1[:, i] = e
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(torch.int8)
