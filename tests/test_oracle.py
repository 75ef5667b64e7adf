"""The fake-quant oracle (tests/oracle.py) itself: by hand on one layer, its two rounding modes, its
independence from fq_compile."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.oracle import QMAX, fake_quant_linear, fake_quantized, rel_err, unpack_nibbles

INF = float("inf")


def _layer(bits, weight_q, act_scale, weight_scale, bias=None):
    return SimpleNamespace(bits=bits, weight_q=weight_q, act_scale=act_scale, weight_scale=weight_scale, bias=bias,
                           out_features=weight_q.shape[0], in_features=2, group="g")


def _group(fold="op"):
    """Two channels, T = 1, s = (2, 1): channel 0 flattened into 2 extra channels (positions 0, 1
    carry [0, T) and [T, 2T), position 2 the remainder), channel 1 as is, one padding position."""
    cmap = SimpleNamespace(src=torch.tensor([0, 0, 0, 1, 0], dtype=torch.int32),
                           lo=torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0]), hi=torch.tensor([1.0, 1.0, INF, INF, INF]),
                           active=torch.tensor([True, True, True, True, False]), size=5)
    return SimpleNamespace(name="g", fold=fold, smooth=torch.tensor([2.0, 1.0]), threshold=1.0, cmap=cmap,
                           in_features=2)


@pytest.mark.parametrize("float32_rounding", [True, False])
def test_one_layer_by_hand(float32_rounding):
    g = _group()
    # INT8: act_scale T/127; x = (-5.5, 0.25) -> x/s = (-2.75, 0.25) -> pieces (-1, -1, -0.75, 0.25, pad)
    lp = _layer(8, torch.tensor([[1, 2, 3, 4, 100]], dtype=torch.int8), 1 / 127, 0.5, torch.tensor([0.25]))
    x = torch.tensor([[-5.5, 0.25]])
    q = torch.tensor([-127.0, -127.0, round(-0.75 * 127), round(0.25 * 127), 0.0])
    want = (q @ torch.tensor([1.0, 2, 3, 4, 100])) / 127 * 0.5 + 0.25
    got = fake_quant_linear(x, g, lp, float32_rounding)
    assert got.shape == (1, 1) and abs(float(got) - float(want)) < 1e-6
    # beyond the calibrated range: the remainder saturates at qmax, it never wraps
    big = fake_quant_linear(torch.tensor([[-100.0, 0.0]]), g, lp, float32_rounding)
    assert abs(float(big) - (-(127 + 2 * 127 + 3 * 127) / 127 * 0.5 + 0.25)) < 1e-6


@pytest.mark.parametrize("float32_rounding", [True, False])
def test_ties_round_half_to_even_and_int4_nibbles(float32_rounding):
    g = _group(fold="rows:producer")          # input already divided by s: taken as it comes
    g.threshold = 1.75
    # INT4 (qmax 7), act_scale 1/4 (T = 7/4): channel 1 = 2.5 units -> 2 (even), 3.5 -> 4, 9 -> 7
    w = torch.tensor([[0, 0, 0, 1, 0, 0]], dtype=torch.int8)          # 6 values: one padding pair
    packed = ((w[:, 0::2].to(torch.int16) & 0xF) | ((w[:, 1::2].to(torch.int16) & 0xF) << 4)).to(torch.uint8)
    assert torch.equal(unpack_nibbles(packed), w.long())
    g.cmap.src = torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.int32)
    g.cmap.lo = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    g.cmap.hi = torch.tensor([1.0, 1.0, INF, INF, INF, INF])
    g.cmap.active = torch.tensor([True, True, True, True, False, False])
    lp = _layer(4, packed, 0.25, 1.0)
    for value, units in ((2.5, 2), (3.5, 4), (-2.5, -2), (-0.5, 0), (9.0, 7)):
        y = fake_quant_linear(torch.tensor([[0.0, value / 4]]), g, lp, float32_rounding)
        assert float(y) == units / 4, value
    negative = torch.tensor([[-1, 7, -7, 3]], dtype=torch.int8)
    pn = ((negative[:, 0::2].to(torch.int16) & 0xF) | ((negative[:, 1::2].to(torch.int16) & 0xF) << 4)).to(torch.uint8)
    assert torch.equal(unpack_nibbles(pn), negative.long())


def test_per_channel_weight_scale_broadcasts():
    """lp.weight_scale may be a float or a float32 [N] vector (per output channel)."""
    g = _group()
    wq = torch.randint(-127, 128, (3, 5), dtype=torch.int8)
    x = torch.randn(4, 2)
    scalar = fake_quant_linear(x, g, _layer(8, wq, 0.01, 0.5))
    vector = fake_quant_linear(x, g, _layer(8, wq, 0.01, torch.full((3,), 0.5)))
    assert torch.equal(scalar, vector)
    scaled = fake_quant_linear(x, g, _layer(8, wq, 0.01, torch.tensor([0.5, 1.0, 2.0])))
    assert torch.allclose(scaled, scalar * torch.tensor([1.0, 2.0, 4.0]), rtol=1e-6)


def test_rounding_modes_agree_and_the_oracle_covers_every_layer():
    """float32 contract rounding (with the plan's norm folds) and the all-float64 reading differ
    only where a value lies within float32 noise of a rounding tie."""
    import fq_compile
    from tests.conftest import VOCAB, batches, tiny_gpt2

    model = tiny_gpt2(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), fq_compile.Config(level="O1"), progress=False)
    assert any(g.fold.startswith("norm:") for g in plan.groups.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        with fake_quantized(model, plan) as calls:
            a = model(x).logits
        with fake_quantized(model, plan, float32_rounding=False):
            b = model(x).logits
        ref = model(x).logits
    assert set(calls) == set(plan.layers) and all(n == 1 for n in calls.values())
    assert rel_err(a, b) < 1e-3 < rel_err(a, ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())    # folds undone
    plan.layers["not.a.layer"] = plan.layers[next(iter(plan.layers))]
    with pytest.raises(LookupError, match="not.a.layer"):
        with fake_quantized(model, plan):
            pass


def test_oracle_imports_nothing_from_fq_compile():
    tree = ast.parse((Path(__file__).parent / "oracle.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"__future__", "contextlib", "collections", "torch"}, mods
    assert QMAX == {8: 127, 4: 7}
