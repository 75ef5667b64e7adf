"""Level auto (planning/formats.py): the cost model, the knapsack, and the planner's choice on a
synthetic model whose layers are built so that one format is right for each."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fq_compile
from fq_compile import Config
from fq_compile.kernels.fp8 import FP8_DTYPE
from fq_compile.planning.formats import DEVICES, candidate_formats, solve


def test_cost_model_follows_the_devices():
    h, a = DEVICES["hopper"], DEVICES["ampere"]
    # Hopper: FP8 = INT8 rate, INT4 saves bytes only, flattening costs K'/K
    assert h.time("fp8", 100, 100) == h.time("int8", 100, 100) == pytest.approx(0.5)
    assert h.time("w4a8", 100, 100) == pytest.approx(0.375) and h.time("int4", 100, 100) == pytest.approx(0.375)
    assert h.time("int8", 100, 120) == pytest.approx(0.5 * 1.2)
    # Ampere: INT4 4x, no FP8
    assert a.time("int4", 100, 100) < a.time("int8", 100, 100)
    assert not a.supports("fp8") and not a.supports("w4a8")
    assert candidate_formats(Config(level="auto", target="ampere"), 64) == ("int8", "int4")
    assert candidate_formats(Config(level="auto"), 63) == ("int8", "int4", "fp8")     # w4a8 packs pairs of K
    with pytest.raises(ValueError, match="leaves no format"):
        candidate_formats(Config(level="auto", target="ampere", formats=("fp8",)), 64)


def _brute(options, budget):
    layers = list(options)
    best = None
    for combo in itertools.product(*(options[l] for l in layers)):
        o = sum(options[l][f][0] for l, f in zip(layers, combo))
        c = sum(options[l][f][1] for l, f in zip(layers, combo))
        if c <= budget and (best is None or o < best[0]):
            best = (o, dict(zip(layers, combo)))
    return best


def test_knapsack_by_hand_and_against_brute_force():
    # two layers: (objective, constrained); budget 3 forces one of them onto its second option
    opts = {"a": {"x": (1.0, 2.0), "y": (2.0, 1.0)}, "b": {"x": (1.0, 2.0), "y": (5.0, 0.5)}}
    choice, lam = solve(opts, 3.0)
    assert choice == {"a": "y", "b": "x"} and 0 < lam < math.inf
    assert solve(opts, 10.0) == ({"a": "x", "b": "x"}, 0.0)               # the budget does not bind
    choice, lam = solve(opts, 0.1)                                         # unreachable: least constrained
    assert choice == {"a": "y", "b": "y"} and lam == math.inf
    g = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(30):
        opts = {f"l{i}": {f: (float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)))
                          for f in "abcd"} for i in range(5)}
        budget = float(torch.rand(1, generator=g)) * 2 + 0.5
        best = _brute(opts, budget)
        choice, _ = solve(opts, budget)
        used = sum(opts[l][f][1] for l, f in choice.items())
        if best is None:
            continue
        assert used <= budget + 1e-12                                      # always feasible when possible
        gaps.append(sum(opts[l][f][0] for l, f in choice.items()) - best[0])
    assert min(gaps) >= -1e-12 and sum(g_ < 1e-12 for g_ in gaps) >= 0.8 * len(gaps)   # optimal on most


def test_error_budget_caps_each_layer_not_the_sum():
    from fq_compile.planning.formats import Option, choose_formats

    def opts(**fmts):
        return {f: Option(f, t, 1.0, e, 1) for f, (t, e) in fmts.items()}

    layers = {"a": opts(int8=(0.6, 1.0), fp8=(0.5, 3.0)),       # fp8 faster, 1.5x naive's error
              "b": opts(int8=(0.6, 0.1), fp8=(0.5, 0.2)),       # both well within
              "c": opts(int8=(0.6, 5.0), fp8=(0.5, 4.0))}       # none within: the most accurate
    naive = {"a": 2.0, "b": 2.0, "c": 2.0}
    choice, why, summary = choose_formats(layers, Config(level="auto", error_budget=1.0), naive)
    # a summed cap (6.0) would have let layer a take fp8 on layer b's slack
    assert choice == {"a": "int8", "b": "fp8", "c": "fp8"}
    assert summary["over_budget"] == ["c"] and "no format within" in why["c"] and "over 1x" in why["a"]
    choice, _, summary = choose_formats(layers, Config(level="auto", error_budget=1.5), naive)
    assert choice["a"] == "fp8" and summary["over_budget"] == ["c"]


# -- a synthetic model: one input and one linear per layer, each built to favour one format ----------

C, N = 64, 48


class ThreeLayers(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.w4 = torch.nn.Linear(C, N, bias=False)
        self.fp8 = torch.nn.Linear(C, N, bias=False)
        self.int8 = torch.nn.Linear(C, N, bias=True)
        with torch.no_grad():
            for name, w in weights.items():
                getattr(self, name).weight.copy_(w)

    def forward(self, a, b, c):
        return self.w4(a), self.fp8(b), self.int8(c)


def _e4m3_values(shape, gen, top=448.0):
    """Numbers exactly on the e4m3 grid, with |max| = top (so a max-based scale keeps them exact)."""
    v = (torch.randn(shape, generator=gen) * 40).to(FP8_DTYPE).float()
    v[..., 0] = top
    return v


def _synthetic(seed=0):
    """w4: weights on one int4 grid (every row reaches +-7 * s) and e4m3 inputs: w4a8 and fp8 are exact,
    w4a8 is cheaper.  fp8: e4m3 weights with one 448 per row (on a small input channel) and the rest
    small: only fp8 is exact (integer grids flush the small weights, which carry half the output).
    int8: Gaussian weights and inputs with mild outlier channels: flattened INT8 is far more accurate
    than FP8, which is far more accurate than INT4 / W4A8."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(-7, 8, (N, C), generator=gen).float()
    k[:, 0] = 7.0
    w4 = k * 0.01
    w8 = (torch.randn(N, C, generator=gen) * 0.5).to(FP8_DTYPE).float()
    w8[:, 1] = 448.0                                            # meets a small input channel (below)
    wi = torch.randn(N, C, generator=gen) * 0.1
    model = ThreeLayers({"w4": w4, "fp8": w8, "int8": wi}).eval()
    batches = []
    for _ in range(3):
        a = _e4m3_values((8, C), gen)
        b = _e4m3_values((8, C), gen)
        b[:, 1] *= 2.0**-6                                     # still on the grid (power-of-two scale)
        c = torch.randn(8, C, generator=gen)
        c[:, :3] *= torch.tensor([8.0, 12.0, 16.0])
        batches.append(dict(a=a, b=b, c=c))
    return model, batches


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic()


def _plan(model, batches, **kw):
    torch._dynamo.reset()
    return fq_compile.calibrate(model, batches, Config(level="auto", smoothing="none", skip=(), **kw), progress=False)


def test_auto_picks_the_format_each_layer_was_built_for(synthetic):
    model, batches = synthetic
    plan = _plan(model, batches, error_budget=0.5)
    got = {n: lp.format for n, lp in plan.layers.items()}
    assert got == {"w4": "w4a8", "fp8": "fp8", "int8": "int8"}, {n: lp.why for n, lp in plan.layers.items()}
    e = {n: lp.errors for n, lp in plan.layers.items()}
    assert e["w4"]["w4a8"] < 1e-12 and e["w4"]["fp8"] < 1e-12 < e["w4"]["int8"]
    assert e["fp8"]["fp8"] < 1e-12 < 1e-3 < min(e["fp8"][f] for f in ("int8", "int4", "w4a8"))
    assert e["int8"]["int8"] * 20 < e["int8"]["fp8"]
    for lp in plan.layers.values():
        assert lp.error == lp.errors[lp.format] and lp.why.startswith(lp.format)
    auto = plan.calibration["auto"]
    assert auto["mode"] == "error" and auto["over_budget"] == []
    # a looser budget lets the int8 layer take the cheaper FP8 (its error is exactly naive FP8's here)
    assert _plan(model, batches, error_budget=1.0).layers["int8"].format == "fp8"
    # the compiled model runs every format and reproduces the measured errors' ordering
    x = batches[0]
    with torch.no_grad():
        ref = model(**x)
        torch._dynamo.reset()
        out = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(**x)
    assert torch.allclose(out[0], ref[0], rtol=1e-5, atol=1e-5) and torch.allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)
    assert 0 < float((out[2] - ref[2]).norm() / ref[2].norm()) < 0.02
    text = fq_compile.explain(plan)
    assert "w4a8" in text and "why each format" in text and "error budget 0.5x naive FP8" in text
    assert "largest output error" in text and max(map(len, text.splitlines())) <= 120
    for name, lp in plan.layers.items():        # every layer's reason in the full view
        assert " ".join(f"{name}: {lp.why}".split()) in " ".join(fq_compile.explain(plan, full=True).split())


def test_ampere_memory_budget_puts_int4_where_it_costs_least(synthetic):
    model, batches = synthetic
    plan8 = _plan(model, batches, target="ampere", formats=("int8",))
    sizes = {n: lp.weight_bytes for n, lp in plan8.layers.items()}
    fp16 = sum(lp.in_features * lp.out_features * 2 for lp in plan8.layers.values())
    # room for exactly one layer in INT4: the one whose INT4 error grows least (the int4-grid weights)
    budget = (sum(sizes.values()) - sizes["w4"] / 2 + 1) / fp16
    plan = _plan(model, batches, target="ampere", memory_budget=budget)
    got = {n: lp.format for n, lp in plan.layers.items()}
    assert got["w4"] == "int4" and got["int8"] == "int8", {n: (lp.errors, lp.why) for n, lp in plan.layers.items()}
    assert sum(lp.weight_bytes for lp in plan.layers.values()) <= budget * fp16
    assert plan.calibration["auto"]["mode"] == "memory"


def test_fp8_level_is_naive_fp8_everywhere(synthetic):
    model, batches = synthetic
    plan = fq_compile.calibrate(model, batches, Config(level="fp8", skip=(), weight_scale="channel"), progress=False)
    assert {lp.format for lp in plan.layers.values()} == {"fp8"}
    for lp in plan.layers.values():         # per-tensor weight scale whatever weight_scale says
        assert lp.weight_q.dtype == FP8_DTYPE and bool((lp.weight_scale == lp.weight_scale[0]).all())
        assert torch.equal(plan.groups[lp.group].smooth, torch.ones(C))


# -- auto's errors on held-out rows (passes/observe.py HELD_OUT, planner._measurement_groups) -------

def test_observer_holds_rows_out_of_the_fit_maxima():
    from fq_compile.passes.observe import HELD_OUT, InputStats
    gen = torch.Generator().manual_seed(0)
    stats = InputStats(layers=["fc"], in_features=C, sample_size=64, generator=torch.Generator().manual_seed(5),
                       hold_out=True)
    plain = InputStats(layers=["fc"], in_features=C, sample_size=64, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)              # the observer's keys, drawn again
    rows, keys = [], []
    for _ in range(4):
        x = torch.randn(2, 50, C, generator=gen)          # [B, S, C]: rows are flattened
        stats.update(x)
        plain.update(x)
        rows.append(x.reshape(-1, C))
        keys.append(torch.rand(100, generator=replay))
    rows, keys = torch.cat(rows), torch.cat(keys)
    assert torch.equal(stats.absmax, rows.abs().amax(0))
    assert torch.equal(stats.fit_absmax, rows[keys >= HELD_OUT].abs().amax(0))
    assert plain.fit_absmax is None and torch.equal(plain.sample, stats.sample)   # kept only when asked
    held = stats.held_out_sample
    expect = rows[torch.sort(keys).indices[:64]]           # the sample: the 64 smallest keys
    expect = expect[torch.sort(keys).values[:64] < HELD_OUT]
    assert held.shape[0] == int((torch.sort(keys).values[:64] < HELD_OUT).sum()) > 0
    assert {tuple(r.tolist()) for r in held} == {tuple(r.tolist()) for r in expect}


class OneLayer(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = torch.nn.Linear(C, N, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x)


def _spiky_stats(held_out: bool):
    """One input: Gaussian rows; the held-out rows carry channel 5 at ~30x what the other rows reach.
    held_out=False: the same rows, none held out (every row sets the maxima and is measured)."""
    from fq_compile.passes.observe import HELD_OUT, InputStats
    gen = torch.Generator().manual_seed(0)
    fit, held = torch.randn(384, C, generator=gen), torch.randn(128, C, generator=gen)
    held[::2, 5] *= 30.0
    stats = InputStats(layers=["fc"], in_features=C, sample_size=512, generator=gen)
    rows = torch.cat([held, fit])
    keys = torch.cat([torch.full((128,), HELD_OUT / 2), torch.full((384,), (1 + HELD_OUT) / 2)])
    stats.absmax, stats.rows = rows.abs().amax(0), rows.shape[0]
    stats._sample, stats._keys = rows, keys if held_out else torch.ones(512)
    stats.fit_absmax = fit.abs().amax(0) if held_out else None
    return stats


def test_auto_measures_on_held_out_rows_where_static_scales_saturate():
    from fq_compile.planning.planner import build_plan
    w = torch.randn(N, C, generator=torch.Generator().manual_seed(1)) * 0.1
    model = OneLayer(w).eval()
    cfg = Config(level="auto", skip=())
    held = build_plan(model, {"fc": _spiky_stats(True)}, {}, {}, cfg, progress=False)
    seen = build_plan(model, {"fc": _spiky_stats(False)}, {}, {}, cfg, progress=False)
    assert held.calibration["auto"]["measured_on"].startswith("held-out calibration rows (>= 128 per group")
    assert seen.calibration["auto"]["measured_on"] == "calibration rows"
    e_held, e_seen = held.layers["fc"].errors, seen.layers["fc"].errors
    # the held-out rows pass the fit maxima: static e4m3 saturates there, per-token INT8 does not
    assert e_held["fp8"] > 100 * e_seen["fp8"] and e_held["int8"] < 10 * e_seen["int8"]
    assert e_held["int8"] < e_held["fp8"] / 100
    # the yardstick (naive FP8, per tensor) is measured on the same rows with the same maxima
    assert held.calibration["auto"]["naive_fp8_error"] > 100 * seen.calibration["auto"]["naive_fp8_error"]
    # the plan itself is built from every row's maxima
    assert torch.equal(held.groups["fc"].act_max, _spiky_stats(True).absmax)
