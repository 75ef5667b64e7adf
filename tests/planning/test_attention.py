"""planning/attention.py and the attention observers: scales from hand-made inputs whose maxima are
known, per tensor and per head, both formats; V planned for what the model computes after a row fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fq_compile
from fq_compile import Config
from fq_compile.planning.attention import head_scales, replan_attention, v_row_fold
from tests.conftest import batches, tiny_opt

F = nn.functional


class _Identity(nn.Module):
    """Attention whose Q, K and V are the input itself (identity projections), split into 2 heads of 4,
    with GQA (1 kv head) when kv=1: the observed maxima are the input's."""

    def __init__(self, kv: int = 2):
        super().__init__()
        self.kv = kv
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4 * kv, bias=False)
        self.v_proj = nn.Linear(8, 4 * kv, bias=False)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(8))
            self.k_proj.weight.copy_(torch.eye(8)[: 4 * kv])
            self.v_proj.weight.copy_(torch.eye(8)[: 4 * kv] * 2.0)      # V = 2x

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, 2, 4).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv, 4).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != 2)


def _hand_made():
    """Two batches; channel maxima: head 0 (channels 0-3) peaks at 3.0, head 1 (4-7) at 6.35."""
    a = torch.full((1, 5, 8), 0.5)
    a[0, 2, 1] = -3.0
    b = torch.full((1, 5, 8), 0.25)
    b[0, 4, 6] = 6.35
    return [{"x": a}, {"x": b}]


class _Wrap(nn.Module):
    def __init__(self, kv):
        super().__init__()
        self.attn = _Identity(kv)

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_scales_from_hand_made_inputs(fmt, granularity):
    model = _Wrap(kv=2).eval()
    plan = fq_compile.calibrate(model, _hand_made(), Config(level="fp16", attention=fmt, attention_scales=granularity),
                                progress=False)
    ap = plan.attention["attn"]
    qmax = 127.0 if fmt == "int8" else 448.0
    assert (ap.num_heads, ap.num_kv_heads, ap.head_dim, ap.qk_format, ap.pv_format) == (2, 2, 4, fmt, fmt)
    assert torch.equal(ap.q_absmax, torch.tensor([[0.5, 3.0, 0.5, 0.5], [0.5, 0.5, 6.35, 0.5]]))
    assert torch.equal(ap.v_absmax, 2 * ap.q_absmax)
    per_head = torch.tensor([3.0, 6.35]) if granularity == "head" else torch.tensor([6.35, 6.35])
    for scale, factor in ((ap.q_scale, 1.0), (ap.k_scale, 1.0), (ap.v_scale, 2.0)):
        assert torch.allclose(scale, per_head * factor / qmax, rtol=1e-6, atol=0)
        assert scale.dtype == torch.float32


def test_grouped_query_heads_get_their_own_scales():
    model = _Wrap(kv=1).eval()
    plan = fq_compile.calibrate(model, _hand_made(), Config(level="fp16", attention="int8", attention_scales="head"),
                                progress=False)
    ap = plan.attention["attn"]
    assert (ap.num_heads, ap.num_kv_heads) == (2, 1)
    assert torch.allclose(ap.k_scale, torch.tensor([3.0 / 127]))
    assert torch.allclose(ap.q_scale, torch.tensor([3.0, 6.35]) / 127)


def test_head_scales_edge_cases():
    am = torch.tensor([[1.0, 2.0], [0.0, 0.0], [4.0, 0.5]])
    assert torch.equal(head_scales(am, "int8", "head"), torch.tensor([2.0, 4.0, 4.0]) / 127)   # a zero head: never 0
    assert torch.equal(head_scales(am, "fp8", "tensor"), torch.full((3,), 4.0 / 448))
    assert torch.equal(head_scales(torch.zeros(2, 3), "int8", "tensor"), torch.full((2,), 1 / 127))
    with pytest.raises(ValueError, match="heads, dim"):
        head_scales(torch.ones(3), "int8", "head")


def test_v_is_planned_after_the_row_fold():
    """OPT (one kv head per head): o_proj's smoothing is folded into v_proj's rows, so the model makes
    V / s.  The planned V maxima are the float model's V divided by s, channel by channel.  Without a
    KV cache: a cache reads V too, and then the fold analysis keeps the smoothing in the op instead."""
    model = tiny_opt(layers=1)
    model.config.use_cache = False
    data = batches(n=2)
    plan = fq_compile.calibrate(model, data, Config(level="O1", attention="int8"), progress=False)
    name = "model.decoder.layers.0.self_attn"
    v_layer = f"{name}.v_proj"
    fold = v_row_fold(plan, v_layer, 4, 16)
    assert fold is not None and not torch.equal(fold, torch.ones_like(fold))
    seen = []
    hook = model.get_submodule(v_layer).register_forward_hook(lambda m, i, o: seen.append(o.detach().abs()))
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    observed = torch.cat([s.reshape(-1, 4, 16) for s in seen]).amax(0)
    assert torch.allclose(plan.attention[name].v_absmax, observed / fold, rtol=1e-5)
    assert torch.allclose(plan.attention[name].v_scale, (observed / fold).max().expand(4) / 127, rtol=1e-5)


def test_replan_changes_formats_without_calibrating():
    model = _Wrap(kv=2).eval()
    plan = fq_compile.calibrate(model, _hand_made(), Config(level="fp16", attention="int8"), progress=False)
    fp8 = replan_attention(plan, attention="fp8", attention_pv="int8", attention_scales="head")
    ap = fp8.attention["attn"]
    assert (ap.qk_format, ap.pv_format) == ("fp8", "int8") and fp8.config.attention_pv == "int8"
    assert torch.allclose(ap.q_scale, torch.tensor([3.0, 6.35]) / 448)
    assert torch.allclose(ap.v_scale, torch.tensor([6.0, 12.7]) / 127)
    assert plan.attention["attn"].qk_format == "int8"               # the original is untouched
    with pytest.raises(ValueError, match="attention='int8' or 'fp8'"):
        replan_attention(plan, attention="fp")


def test_attention_knobs_are_checked():
    from fq_compile import ConfigError
    for kw, knob in ((dict(attention="int4"), "attention"), (dict(attention="fp", attention_pv="int8"), "attention_pv"),
                     (dict(attention="int8", attention_pv="bf16"), "attention_pv"),
                     (dict(attention_scales="channel"), "attention_scales")):
        with pytest.raises(ConfigError, match=knob):
            Config(**kw)
    assert Config(attention="int8", attention_pv="fp8").attention_formats == ("int8", "fp8")
    assert Config().attention_formats is None


def test_validate_names_a_bad_attention_field():
    """QuantPlan.validate (run by save and load) checks the attention sites too, naming the field."""
    import dataclasses

    from fq_compile.plan import PlanFormatError

    plan = fq_compile.calibrate(_Wrap(kv=1).eval(), _hand_made(), Config(level="fp16", attention="int8"), progress=False)
    plan.validate()
    ap = plan.attention["attn"]
    for field, value, match in (("k_scale", torch.tensor([0.0]), r"attention\['attn'\]\.k_scale"),
                                ("kv_block", 48, r"attention\['attn'\]\.kv_block"),
                                ("pv_format", "int4", r"attention\['attn'\]\.pv_format"),
                                ("num_kv_heads", 3, r"attention\['attn'\]\.num_kv_heads")):
        plan.attention["attn"] = dataclasses.replace(ap, **{field: value})
        with pytest.raises(PlanFormatError, match=match):
            plan.validate()
