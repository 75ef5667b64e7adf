"""Per-token activation scales (Config.activation_scale="token") on one synthetic layer whose test
rows exceed the calibrated range: the static per-tensor scale saturates them, per-token scales do not
and match the float64 reading of the independent oracle (tests/oracle.py) to float32 precision."""

from __future__ import annotations

import pytest
import torch

from fq_compile.config import Config
from fq_compile.passes.observe import InputStats
from fq_compile.planning.formats import simulate
from fq_compile.planning.planner import plan_group, plan_layer
from tests.oracle import fake_quant_linear, quantized_activation

C, N = 64, 48


def _layer(mode: str, bits: int = 8):
    """Calibrate one layer on rows with two outlier channels, then plan it in `mode`."""
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(256, C, generator=gen)
    calib[:, 3] *= 12.0
    calib[:, 17] *= 6.0
    stats = InputStats(layers=["fc"], in_features=C, sample_size=256, generator=gen)
    stats.update(calib)
    w = torch.randn(N, C, generator=gen) * 0.1
    cfg = Config(level="O1", activation_scale=mode)
    g = plan_group("fc", stats, {"fc": w}, "op", "test", cfg)
    fmt = "int4" if bits == 4 else "int8"
    lp = plan_layer("fc", g, w, None, None, None, cfg, None, fmt=fmt)
    return g, lp, w


def _test_rows():
    """Rows 3-10x beyond the calibrated maxima in an outlier channel and a plain one."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, C, generator=gen)
    x[:, 3] *= 12.0
    x[::2, 3] *= 8.0           # far past the calibrated max of channel 3
    x[1::4, 40] = 30.0         # a plain channel (E = 0) at ~10x its calibrated max
    return x


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits", [8, 4])
def test_static_scale_saturates_and_per_token_does_not(bits):
    x = _test_rows()
    qmax = 127 if bits == 8 else 7
    g_t, lp_t, w = _layer("tensor", bits)
    g_r, lp_r, _ = _layer("token", bits)
    assert g_r.activation_scale == "token" and g_t.activation_scale == "tensor"
    assert torch.equal(g_t.extra, g_r.extra) and g_t.extra[3] > 0       # the same static channel map
    q_t, _ = quantized_activation(x, g_t, lp_t)
    q_r, r = quantized_activation(x, g_r, lp_r)
    # static: the beyond-range rows saturate (their slices pinned at qmax, the value lost); per token:
    # every row's largest slice is exactly qmax and nothing beyond
    assert (q_t.abs() == qmax).sum() > (q_r.abs() == qmax).sum() // 2 and (q_t.abs() == qmax).any()
    assert torch.equal(q_r.abs().amax(-1), torch.full((x.shape[0],), float(qmax), dtype=torch.float64))
    ref = x.double() @ w.double().t()
    y_t = simulate(lp_t.format, x, lp_t, g_t)      # the compiled model's ops (CPU references)
    y_r = simulate(lp_r.format, x, lp_r, g_r)
    # the ops equal the oracle's float32 reading bit for bit, and its float64 reading to float32 precision
    assert torch.equal(y_r, fake_quant_linear(x, g_r, lp_r))
    assert _rel(y_r, fake_quant_linear(x, g_r, lp_r, float32_rounding=False)) < 1e-5
    assert _rel(y_t, fake_quant_linear(x, g_t, lp_t, float32_rounding=False)) < 1e-5
    # and per-token is far more accurate on these rows
    assert _rel(y_r, ref) < 0.5 * _rel(y_t, ref), (_rel(y_r, ref), _rel(y_t, ref))


def test_token_layers_restricts_the_groups():
    cfg = Config(level="O1", token_layers=("down_proj",))
    assert cfg.token_scaled("model.layers.0.mlp.down_proj") and not cfg.token_scaled("model.layers.0.mlp.up_proj")
    assert not Config(level="w8a8").token_scaled("x") and Config(level="w8a8", activation_scale="token").token_scaled("x")
    assert Config(level="O1", activation_scale="tensor").activation_granularity == "tensor"
