"""Static scales for quantized attention (fq::attention): Q, K and V, per tensor or per head, from the
maxima observed at calibration.  P needs no scale (relative to the running max it lies in [0, 1]; see
fq_compile/kernels/attention.py).

Pure functions of the statistics, plus the one fact from the linear plan that changes V: when the
smoothing scales of o_proj's input are folded into v_proj's rows (passes/fold.py), the model computes
V / s, channel by channel, and V's scale must be planned for that tensor, not for the observed one.
"""

from __future__ import annotations

import copy

import torch

from fq_compile.config import Config
from fq_compile.kernels.attention import KV_BLOCK, QMAX
from fq_compile.passes.observe import AttentionStats
from fq_compile.plan import AttentionPlan, QuantPlan


def head_scales(absmax: torch.Tensor, fmt: str, granularity: str) -> torch.Tensor:
    """absmax [H, D] -> float32 [H]: max |x| / qmax per head ("head") or over all heads ("tensor",
    repeated).  A head that never saw a nonzero value gets the tensor's scale (never 0)."""
    if absmax.dim() != 2:
        raise ValueError(f"absmax must be [heads, dim], got {tuple(absmax.shape)}")
    per_head = absmax.float().amax(dim=1)
    top = float(per_head.max()) if per_head.numel() else 0.0
    if not top > 0:
        top = 1.0
    per_head = torch.full_like(per_head, top) if granularity == "tensor" else torch.where(
        per_head > 0, per_head, torch.full_like(per_head, top))
    return (per_head / QMAX[fmt]).float()


def v_row_fold(plan: QuantPlan, v_layer: str | None, kv_heads: int, v_dim: int) -> torch.Tensor | None:
    """The smoothing vector [Hkv, Dv] folded into v_layer's rows (V is divided by it), or None."""
    if v_layer is None:
        return None
    for g in plan.groups.values():
        if g.fold == f"rows:{v_layer}" and g.smooth.numel() == kv_heads * v_dim:
            return g.smooth.float().reshape(kv_heads, v_dim)
    return None


def plan_site(stats: AttentionStats, config: Config, v_fold: torch.Tensor | None = None,
              kv_block: int = KV_BLOCK) -> AttentionPlan:
    qk_fmt, pv_fmt = config.attention_formats
    v_absmax = stats.v_absmax if v_fold is None else stats.v_absmax / v_fold
    hq, d = stats.q_absmax.shape
    hkv, dv = stats.v_absmax.shape
    g = config.attention_scales
    return AttentionPlan(name=stats.site, num_heads=hq, num_kv_heads=hkv, head_dim=d, v_head_dim=dv,
                         qk_format=qk_fmt, pv_format=pv_fmt, q_scale=head_scales(stats.q_absmax, qk_fmt, g),
                         k_scale=head_scales(stats.k_absmax, qk_fmt, g), v_scale=head_scales(v_absmax, pv_fmt, g),
                         q_absmax=stats.q_absmax.float(), k_absmax=stats.k_absmax.float(),
                         v_absmax=v_absmax.float(), kv_block=kv_block, layer_idx=stats.layer_idx)


def plan_attention(plan: QuantPlan, stats: dict[str, AttentionStats], unsupported: dict[str, str],
                   config: Config) -> None:
    """Fill plan.attention (one AttentionPlan per observed site) and plan.attention_skipped."""
    plan.attention_skipped.update(unsupported)
    for name, st in stats.items():
        if st.q_absmax is None:
            plan.attention_skipped[name] = "never executed during calibration"
            continue
        hkv, dv = st.v_absmax.shape
        plan.attention[name] = plan_site(st, config, v_row_fold(plan, st.v_layer, hkv, dv))


def replan_attention(plan: QuantPlan, **overrides) -> QuantPlan:
    """A copy of `plan` whose attention scales follow Config overrides (attention, attention_pv,
    attention_scales), from the maxima the plan kept: no second calibration."""
    config = Config.from_dict({**plan.config.to_dict(), **overrides})
    if config.attention_formats is None:
        raise ValueError("replan_attention needs attention='int8' or 'fp8'")
    if not plan.attention:
        raise ValueError("this plan holds no attention statistics: calibrate with Config(attention='int8' or 'fp8')")
    new = copy.copy(plan)
    new.config = config
    new.attention = {}
    for name, ap in plan.attention.items():
        st = AttentionStats(name, layer_idx=ap.layer_idx, q_absmax=ap.q_absmax, k_absmax=ap.k_absmax,
                            v_absmax=ap.v_absmax)    # v_absmax already carries the row fold
        new.attention[name] = plan_site(st, config, kv_block=ap.kv_block)
    return new
