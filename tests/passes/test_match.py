"""passes/match.py: every linear form Dynamo writes (linear, Conv1D's addmm, x @ W.T + b) is found
with its parameters' names; weights read any other way are named with the reason."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fq_compile.passes.match import ParamNames, linear_forms, other_weight_reads


class Forms(torch.nn.Module):
    """One of each form, plus things that must not count as linear layers."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.lin = torch.nn.Linear(8, 6)
        self.conv = Conv1D(5, 6)                                # weight [6, 5]: K x N
        self.wt = torch.nn.Parameter(torch.randn(4, 5))         # used as x @ W.T + b
        self.bt = torch.nn.Parameter(torch.randn(4))
        self.wn = torch.nn.Parameter(torch.randn(4, 3))         # used as x @ W: stored K x N
        self.experts = torch.nn.Parameter(torch.randn(2, 3, 3))  # a batched matmul over a 3-D weight
        self.mix = torch.nn.Parameter(torch.randn(3, 3))        # read by einsum: not a linear form

    def forward(self, ids):
        x = self.emb(ids)
        h = self.conv(self.lin(x))
        h = h @ self.wt.T + self.bt
        h = torch.matmul(h, self.wn)
        attn = h @ h.transpose(-1, -2)                          # two activations: not a linear layer
        e = torch.bmm(self.experts, h.transpose(1, 2))
        return attn.sum() + e.sum() + torch.einsum("btc,cd->btd", h, self.mix).sum()


def _graph(model, *args):
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return captured[0]


def test_every_form_is_found_with_its_parameters():
    model = Forms()
    gm, ex = _graph(model, torch.randint(0, 16, (2, 3)))
    by_id = {id(p): n for n, p in model.named_parameters()}
    name_of = ParamNames(gm, ex, by_id=by_id)
    forms = {name_of(f.weight): f for f in linear_forms(gm, name_of)}
    assert set(forms) == {"lin.weight", "conv.weight", "wt", "wn"}
    kinds = {n: (f.kind, f.transposed, name_of(f.bias) if f.bias is not None else None, f.weight_shape())
             for n, f in forms.items()}
    assert kinds == {"lin.weight": ("linear", False, "lin.bias", (6, 8)),
                     "conv.weight": ("addmm", True, "conv.bias", (5, 6)),
                     "wt": ("matmul", False, "bt", (4, 5)),
                     "wn": ("matmul", True, None, (3, 4))}
    assert forms["wt"].out is not forms["wt"].node and forms["wt"].views        # the bias add and W.T
    kept = other_weight_reads(gm, list(forms.values()), name_of)
    assert set(kept) == {"experts", "mix"}
    assert "MoE experts" in kept["experts"] and "bmm" in kept["experts"]
    assert "einsum" in kept["mix"] and "not as a linear layer" in kept["mix"]


def test_a_non_parameter_operand_is_not_a_linear_layer():
    w = torch.randn(4, 8)

    def f(x):
        return x @ w.T + 1.0

    gm, ex = _graph(f, torch.randn(3, 8))
    names = ParamNames(gm, ex, by_id={})
    assert linear_forms(gm, names) == [] and other_weight_reads(gm, [], names) == {}


@pytest.mark.parametrize("bias", [True, False])
def test_falcon_linear_form(bias):
    from transformers.models.falcon.modeling_falcon import FalconLinear

    lin = FalconLinear(8, 4, bias=bias)
    gm, ex = _graph(lin, torch.randn(2, 3, 8))
    name_of = ParamNames(gm, ex, by_id={id(p): n for n, p in lin.named_parameters()})
    (form,) = linear_forms(gm, name_of)
    assert (form.kind, form.transposed, name_of(form.weight)) == ("matmul", False, "weight")
    assert (name_of(form.bias) if form.bias is not None else None) == ("bias" if bias else None)


@pytest.mark.parametrize("op", ["numpy_T", "mT", "t"])
def test_aten_transposes_are_transposes(op):
    """torch >= 2.14 traces `W.T` / `W.mT` as aten.numpy_T / aten.mT calls (older versions as getattr):
    either form is a transpose of W, so x @ W.T is still a linear layer."""
    from torch import fx

    from fq_compile.passes.match import _transpose_of

    if not hasattr(torch.ops.aten, op):
        pytest.skip(f"this torch has no aten.{op}")
    g = fx.Graph()
    w = g.placeholder("w")
    for target in (getattr(torch.ops.aten, op), getattr(torch.ops.aten, op).default):
        assert _transpose_of(g.call_function(target, (w,))) is w
    assert _transpose_of(g.call_function(torch.ops.aten.abs.default, (w,))) is None
