"""passes/fold.py and the fold checks of passes/lower.py on small hand-written modules: a fold is
used only where every tensor between producer and consumer has one reader and both are in the
graph being rewritten; the bias of a linear is the one its call reads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fq_compile
from fq_compile import Config
from fq_compile.runtime.guards import fingerprint
from fq_compile.runtime.state import reports

D = 32


def _data(n=2, shape=(2, 6, D), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * torch.linspace(0.5, 8, D) for _ in range(n)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class ReluMlp(nn.Module):
    """norm -> fc1 -> ReLU -> fc2; `escape` also returns fc1's output (through a view)."""

    def __init__(self, escape=False, graph_break=False):
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.escape, self.graph_break = escape, graph_break

    def forward(self, x):
        h = self.fc1(self.ln(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        y = self.fc2(torch.relu(h))
        return (y, h.view(-1, 2 * D)) if self.escape else y


class GatedMlp(nn.Module):
    def __init__(self, escape=False):
        super().__init__()
        torch.manual_seed(1)
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.escape = escape

    def forward(self, x):
        u = self.up(x)
        y = self.down(F.silu(self.gate(x)) * u)
        return (y, u) if self.escape else y


class Attention(nn.Module):
    """q/k/v -> SDPA -> o; `mode`: "plain", "return_v" (V handed back, as a KV cache is) or
    "cat" (V concatenated with a past passed in)."""

    def __init__(self, mode="plain"):
        super().__init__()
        torch.manual_seed(2)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.mode = mode

    def forward(self, x, past_k=None, past_v=None):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 4, D // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.mode == "cat":
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v)
        y = self.o(a.transpose(1, 2).reshape(b, s, D))
        return (y, v) if self.mode == "return_v" else y


def _folds(model, data=None, level="O1"):
    torch._dynamo.reset()
    plan = fq_compile.calibrate(model.eval(), data or _data(), Config(level=level), progress=False)
    return plan, {name.split("+")[0]: (g.fold, g.fold_note) for name, g in plan.groups.items()}


def test_row_fold_needs_one_reader_on_every_tensor():
    _, folds = _folds(ReluMlp())
    assert folds["fc2"][0] == "rows:fc1" and folds["fc1"][0] == "norm:ln.weight,ln.bias"
    _, folds = _folds(ReluMlp(escape=True))                  # fc1's output is also returned
    assert folds["fc2"] == ("op", "ReLU input is not a planned linear read only by it")
    _, folds = _folds(GatedMlp())
    assert folds["down"][0] == "rows:up"
    _, folds = _folds(GatedMlp(escape=True))
    assert folds["down"][0] == "op" and "read only by it" in folds["down"][1]


def test_value_fold_refuses_returned_values_and_a_past():
    _, folds = _folds(Attention())
    assert folds["o"][0] == "rows:v"
    _, folds = _folds(Attention("return_v"))
    assert folds["o"][0] == "op" and "KV cache returned" in folds["o"][1]
    past = [{"x": x, "past_k": torch.randn(2, 4, 3, D // 4), "past_v": torch.randn(2, 4, 3, D // 4)} for x in _data()]
    _, folds = _folds(Attention("cat"), past)
    assert folds["o"][0] == "op" and "concatenated" in folds["o"][1]


def test_row_fold_split_by_a_graph_break_stays_exact():
    """A plan whose fc2 smoothing is folded into fc1's rows, compiled where a graph break separates
    fc1 from fc2: fc1's graph multiplies its output by s again and fc2's graph smooths in the op,
    so the result is the folded one up to rounding (without that, fc2 would see h / s)."""
    model = ReluMlp()
    plan, folds = _folds(model)
    assert folds["fc2"][0] == "rows:fc1"
    x = _data(1, seed=9)[0]
    opts = {"plan": plan, "inductor": False}
    with torch.no_grad():
        folded = torch.compile(model, backend="flattenquant", options=opts)(x)
        torch._dynamo.reset()
        reports(plan).clear()
        model.graph_break = True
        split = torch.compile(model, backend="flattenquant", options=opts)(x)
        ref = model(x)
    assert len(reports(plan)) == 2
    by_layer = {lr.layer: lr for r in reports(plan) for lr in r.layers}
    assert "multiplied by the smoothing" in by_layer["fc1"].reason
    assert by_layer["fc2"].smoothing == "op" and "not in this graph" in by_layer["fc2"].reason
    # the same quantized computation up to the rounding of (h / s) * s; dividing twice would not be close
    assert _rel(split, folded) < 1e-2 < _rel(folded, ref)


class OddBias(nn.Module):
    """A linear whose call reads another parameter as its bias (or none at all)."""

    def __init__(self, bias_mode):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(D, D)
        self.shift = nn.Parameter(torch.randn(D))
        self.bias_mode = bias_mode

    def forward(self, x):
        bias = {"own": self.fc.bias, "shift": self.shift, "none": None}[self.bias_mode]
        return F.linear(x, self.fc.weight, bias)


def test_bias_is_the_one_the_call_reads():
    plans = {mode: _folds(OddBias(mode), level="w8a8")[0] for mode in ("own", "shift", "none")}
    model = OddBias("shift")
    assert torch.equal(plans["shift"].layers["fc"].bias, model.shift.detach())
    assert plans["shift"].layers["fc"].bias_fingerprint == fingerprint(model.shift)
    assert torch.equal(plans["own"].layers["fc"].bias, model.fc.bias.detach())
    assert plans["none"].layers["fc"].bias is None                # fc.bias exists but is not read
    x = _data(1, seed=4)[0]
    for mode, plan in plans.items():
        m = OddBias(mode)
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(m, backend="flattenquant", options={"plan": plan, "inductor": False})(x)
            assert _rel(out, m(x)) < 0.05, mode
    torch._dynamo.reset()
    with pytest.raises(Exception, match="the plan was made without a bias"):
        torch.compile(OddBias("own"), backend="flattenquant", options={"plan": plans["none"], "inductor": False})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"shift: the weights differ"):
        torch.compile(OddBias("shift"), backend="flattenquant", options={"plan": plans["own"], "inductor": False})(x)


def test_graph_break_inside_a_quantized_layer():
    """A hook Dynamo cannot trace on fc1 splits the frame at the layer: fc1 compiles as a frame of
    its own (its weight named just 'weight', found by fingerprint), its norm fold and fc2's row fold
    fall back to the op, and the result equals the unbroken compile up to rounding."""
    from tests.conftest import VOCAB, batches, tiny_opt

    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    x = torch.randint(0, VOCAB, (1, 7))
    opts = {"plan": plan, "inductor": False}
    with torch.no_grad():
        torch._dynamo.reset()
        whole = torch.compile(model, backend="flattenquant", options=opts)(x).logits
        torch._dynamo.reset()
        reports(plan).clear()
        fc1 = model.model.decoder.layers[0].fc1
        handle = fc1.register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
        try:
            split = torch.compile(model, backend="flattenquant", options=opts)(x).logits
        finally:
            handle.remove()
        ref = model(x).logits
    ops = {lr.layer: lr for r in reports(plan) for lr in r.layers}
    # 7 rows: a decode-sized graph, so the fused op (passes/lower.py)
    assert ops["model.decoder.layers.0.fc1"].op == "fq.flat_linear (int8)" and len(reports(plan)) >= 2
    # the folds moved to the op change float32 rounding only: far below the quantization error
    assert _rel(split, whole) < 0.1 * _rel(whole, ref), (_rel(split, whole), _rel(whole, ref))
