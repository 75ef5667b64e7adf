"""Each planning equation against hand-computed cases."""

import math

import pytest
import torch

from fq_compile.planning.bits import choose_bits, kl_quantized, kl_ratio
from fq_compile.planning.flatten import (
    channel_map,
    extra_channels,
    flatten_values,
    flatten_weight,
    weight_splits,
)
from fq_compile.planning.smooth import (
    sigmoid_smoothing,
    smoothing_scales,
    smoothquant_smoothing,
)
from fq_compile.planning.threshold import boxplot_clip, truncation_threshold
from fq_compile.planning.weights import weight_scale

INF = float("inf")


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_eq5_sigmoid_smoothing_by_hand():
    act = torch.tensor([1.0, 2.0, 3.0, 6.0])      # mu 3, sigma sqrt(3.5)
    w = torch.tensor([0.1, 0.1, 0.2, 0.2])        # mu 0.15, sigma 0.05
    sa = math.sqrt(3.5)
    za = [(a - 3.0) / sa for a in (1, 2, 3, 6)]
    zw = [-1.0, -1.0, 1.0, 1.0]
    want = [_sig(a) ** 0.5 / _sig(b) ** 0.5 for a, b in zip(za, zw)]
    got = sigmoid_smoothing(act, w, 0.5)
    assert torch.allclose(got, torch.tensor(want), rtol=1e-6)
    # alpha = 1 moves everything to the activation side, alpha = 0 to the weight side
    assert torch.allclose(sigmoid_smoothing(act, w, 1.0), torch.tensor([_sig(z) for z in za]), rtol=1e-6)
    assert torch.allclose(sigmoid_smoothing(act, w, 0.0), torch.tensor([1 / _sig(z) for z in zw]), rtol=1e-6)


def test_smoothquant_by_hand_and_dead_channels():
    got = smoothquant_smoothing(torch.tensor([4.0, 9.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5)
    assert torch.allclose(got, torch.tensor([2.0, 1.5, 1.0]))
    assert torch.equal(smoothing_scales("none", torch.rand(5), torch.rand(5), 0.5), torch.ones(5))


def test_eq6_boxplot_clip_and_eq7_threshold():
    m = torch.tensor([1.0] * 7 + [100.0])         # Q1 = Q3 = 1: the outlier is clipped to 1
    assert torch.equal(boxplot_clip(m), torch.ones(8, dtype=torch.float64))
    assert truncation_threshold(m, 1.3) == pytest.approx(1.3)
    assert truncation_threshold(m, 1.3, outlier_clip=False) == pytest.approx(1.3 * 107 / 8)
    m2 = torch.arange(1.0, 9.0)                   # Q1 2.75, Q3 6.25, fences [-2.5, 11.5]: nothing clipped
    assert truncation_threshold(m2, 1.3) == pytest.approx(1.3 * 4.5)


def test_eq2_extra_channels_and_channel_map():
    e = extra_channels(torch.tensor([0.5, 2.6, 1.0, 3.9]), 1.0)
    assert e.tolist() == [0, 2, 1, 3]
    cm = channel_map(e, None, pad_multiple=8)
    assert cm.size == 16
    assert cm.src.tolist() == [0, 1, 2, 3, 1, 1, 2, 3, 3, 3] + [0] * 6
    assert cm.lo.tolist() == [0, 2, 1, 3, 0, 1, 0, 0, 1, 2] + [0] * 6
    assert cm.hi.tolist() == [INF] * 4 + [1] * 6 + [0] * 6
    assert cm.active.tolist() == [True] * 10 + [False] * 6


def test_eq3_greedy_fill_keeps_signs_and_sums_back():
    cm = channel_map(torch.tensor([0, 2]), None, pad_multiple=2)
    x = torch.tensor([[0.3, 2.5], [-0.7, -2.5], [0.1, 0.4]])
    f = flatten_values(x, cm, threshold=1.0)
    # positions: ch0, ch1 remainder, ch1 slice 0, ch1 slice 1
    assert torch.allclose(f, torch.tensor([[0.3, 0.5, 1.0, 1.0], [-0.7, -0.5, -1.0, -1.0], [0.1, 0.0, 0.4, 0.0]]))


def test_eq4_weight_repeat_is_exact_before_quantization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g) * torch.linspace(0.1, 5.0, 12)
    w = torch.randn(7, 12, generator=g)
    m = x.abs().amax(0)
    t = truncation_threshold(m, 1.3)
    cm = channel_map(extra_channels(m, t), None, pad_multiple=32)
    assert cm.size % 32 == 0
    y = flatten_values(x, cm, t) @ flatten_weight(w, cm).T
    assert torch.allclose(y, x @ w.T, atol=1e-5)
    assert float(flatten_values(x, cm, t).abs().max()) <= t * (1 + 1e-6)


def test_weight_splits_are_exact_and_skip_activation_flattened_channels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 6, generator=g)
    w[:, 2] *= 10
    w[:, 4] *= 10
    blocked = torch.tensor([False, False, False, False, True, False])
    d = weight_splits(w.abs().amax(0), 1.3 * float(w.abs().amax(0).median()), blocked)
    assert d[2] > 0 and d[4] == 0
    cm = channel_map(torch.zeros(6, dtype=torch.int64), d, pad_multiple=2)
    x = torch.randn(9, 6, generator=g)
    wf = flatten_weight(w, cm)
    assert torch.allclose(flatten_values(x, cm, 1e9) @ wf.T, x @ w.T, atol=1e-5)
    col2 = wf[:, cm.src == 2]
    assert col2.shape[1] == int(d[2]) + 1
    assert float(col2.abs().max()) == pytest.approx(float(w[:, 2].abs().max()) / (int(d[2]) + 1))


def test_eq8_kl_by_hand():
    # bins of width 0.3 over [0, 0.9]: p = [.5, .25, .25]; scale 0.9, qmax 1: bins 0 and 1 -> level 0
    v = torch.tensor([0.1, 0.1, 0.35, 0.9])
    want = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375)
    assert kl_quantized(v, 0.9, 1, 3) == pytest.approx(want, rel=1e-9)


def test_eq8_ratio_and_choice():
    g = torch.Generator().manual_seed(0)
    assert kl_ratio(torch.randn(20000, generator=g), 4.0, 2048) > 1.0   # INT4 loses more than INT8
    grid = torch.arange(-7, 8).float().repeat(50)                        # exactly on the INT4 grid
    assert kl_ratio(grid, 7.0, 2048) == pytest.approx(1.0)
    assert choose_bits(1.2, 1.5, 1.86) == 4
    assert choose_bits(1.2, 1.9, 1.86) == 8
    assert choose_bits(2.0, 1.0, 1.86) == 8


def test_mse_weight_scale_clips_a_lone_outlier():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[0, 0] = 40.0

    def one(method, q, granularity="tensor"):
        s = weight_scale(w, q, method, granularity)
        assert s.dtype == torch.float32 and s.shape == (64,)
        if granularity == "tensor":
            assert bool((s == s[0]).all())
            return float(s[0])
        return s

    assert one("max", 7) == pytest.approx(40.0 / 7)
    assert one("mse", 7) < 40.0 / 7
    # the coarse-to-fine search lands within 1% of a dense grid's best error, for INT4 and INT8

    def err(s, q):
        s = s[:, None] if isinstance(s, torch.Tensor) else s
        return float(((torch.round(w / s).clamp(-q, q) * s - w) ** 2).sum())

    for q in (7, 127):
        dense = min(err(40.0 * r / q, q) for r in torch.linspace(0.5, 1.0, 501).tolist())
        assert err(one("mse", q), q) <= 1.01 * dense
        assert err(one("mse", q), q) <= err(one("max", q), q)
        # per output channel: each row at its own max (or clip); the outlier only costs its own row
        rowmax = w.abs().amax(dim=1)
        assert torch.allclose(one("max", q, "channel"), rowmax / q)
        assert bool((one("mse", q, "channel") <= rowmax / q * (1 + 1e-6)).all())
        assert err(one("mse", q, "channel"), q) <= err(one("max", q, "channel"), q) < err(one("mse", q), q)


def test_per_channel_mse_matches_a_dense_search_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 200, generator=g) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5])[:, None]
    s = weight_scale(w, 7, "mse", "channel")
    for i in range(6):
        row = w[i]
        top = float(row.abs().max())

        def err(scale):
            return float(((torch.round(row / scale).clamp(-7, 7) * scale - row) ** 2).sum())

        dense = min(err(top * r / 7) for r in torch.linspace(0.5, 1.0, 501).tolist())
        assert err(float(s[i])) <= 1.01 * dense + 1e-12


def test_gptq_beats_round_to_nearest_on_a_synthetic_layer():
    from fq_compile.planning.gptq import HessianAccumulator, gptq_quantize

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(48, 48, generator=g)
    x = torch.randn(2000, 48, generator=g) @ mix          # correlated input channels, like real activations
    w = torch.randn(32, 48, generator=g)
    acc = HessianAccumulator(48)
    acc.add(x[:1000])
    for qmax in (7, 127):
        scale = float(w.abs().max()) / qmax
        rtn = torch.round(w / scale).clamp(-qmax, qmax)
        q = gptq_quantize(w, acc.hessian(), scale, qmax, block_size=16)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
        xt = x[1000:]                                       # held-out rows
        err_rtn = float((xt.double() @ (w.double() - rtn.double() * scale).T).norm())
        err_gptq = float((xt.double() @ (w.double() - q.double() * scale).T).norm())
        assert err_gptq < 0.8 * err_rtn, (qmax, err_gptq, err_rtn)


def test_kl_tensorrt_reading_by_hand_and_its_bounds():
    from fq_compile.planning.bits import kl_ratio_tensorrt, kl_tensorrt

    # 4 bins over [0, 1], one candidate threshold (all bins), 2 levels of 2 bins:
    # p = [.5, .25, 0, .25]; level 0 spreads .75 over 2 non-empty bins, level 1 .25 over 1
    v = torch.tensor([0.1, 0.1, 0.3, 1.0])
    want = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375)
    assert kl_tensorrt(v, 2, 4, candidates=1) == pytest.approx(want, rel=1e-9)
    # a smaller clip can only help: the minimum over thresholds is at most the full-range KL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) ** 3                   # heavy tails
    assert kl_tensorrt(x, 8, 512) <= kl_tensorrt(x, 8, 512, candidates=1) + 1e-12
    assert kl_ratio_tensorrt(x, 512) > 1.0                     # 8 levels lose more than 128


def test_heldout_windows_avoid_calibration_windows():
    from fq_compile.tools.data import _window_starts, heldout_windows

    ids = torch.arange(50_000)                                 # token value = its position
    got = heldout_windows(ids, 5, 1000, calib_n=16, calib_seqlen=512, seed=3)
    assert got.numel() == 5000 and torch.equal(got, heldout_windows(ids, 5, 1000, 16, 512, seed=3))
    cal = torch.zeros(50_000, dtype=torch.bool)
    for s in _window_starts(50_000, 16, 512, 3):
        cal[s:s + 512] = True
    assert not bool(cal[got].any())
    starts = got.view(5, 1000)[:, 0]
    assert bool((starts % 1000 == 0).all()) and bool((got.view(5, 1000).diff(dim=1) == 1).all())
    with pytest.raises(ValueError, match="avoid the calibration"):
        heldout_windows(ids, 40, 1000, calib_n=16, calib_seqlen=512, seed=3)


def test_weight_flattening_end_to_end_on_a_tiny_llama():
    """flatten_weights splits heavy weight columns (not activation-flattened ones), the compiled model
    stays close to fp32, and the flattened weight's max really drops."""
    import fq_compile
    from fq_compile import Config
    from tests.conftest import VOCAB, batches, tiny_llama

    model = tiny_llama()
    with torch.no_grad():                          # heavy weight columns, the way smoothing makes them
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 30
        model.model.layers[1].self_attn.o_proj.weight[:, 9] *= 30
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = model(x).logits
        out = {}
        for fw in (False, True):
            torch._dynamo.reset()
            plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1", flatten_weights=fw, weight_clip="max"),
                                        progress=False)
            fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
            out[fw] = (fast(x).logits, plan)
    plan = out[True][1]
    split = [g for g in plan.groups.values() if int(g.weight_dup.sum()) > 0]
    assert split and all(not bool(((g.weight_dup > 0) & (g.extra > 0)).any()) for g in split)
    for l in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):   # the heavy columns were split
        assert float(plan.layers[l].weight_scale.max()) < 0.5 * float(out[False][1].layers[l].weight_scale.max())
    err = {fw: float((o.float() - ref).norm() / ref.norm()) for fw, (o, _) in out.items()}
    assert err[True] < 0.2 and err[True] < 1.5 * err[False], err
