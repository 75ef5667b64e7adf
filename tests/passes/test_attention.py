"""passes/attention.py: finding attention in Dynamo graphs (both transformers forms), the variants left
alone with their reason, and the rewritten model against an independent fake-quant oracle."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers import (AttentionInterface, BloomConfig, FalconConfig, GemmaConfig, MistralConfig, Qwen2Config,
                          Qwen2ForCausalLM)

import fq_compile
from fq_compile import Config, QuantPlan
from fq_compile.passes.attention import find_attention, variant_reason
from fq_compile.passes.match import ParamNames
from fq_compile.runtime.state import reports
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt

F = nn.functional


def _sites(model, *inputs, **kwargs):
    """The attention sites find_attention reports in the Dynamo graphs of model(*inputs, **kwargs)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = []

    def backend(gm, example_inputs):
        out.extend(find_attention(gm, ParamNames(gm, example_inputs, by_id=by_id)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs, **kwargs)
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_finds_both_forms_names_sites_and_undoes_repeat_kv(make_model, impl):
    model = make_model(layers=2)
    model.set_attn_implementation(impl)
    x = torch.randint(0, VOCAB, (2, 10))
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, :3] = 0
    for kwargs in ({}, {"attention_mask": pad}):
        sites = _sites(model, x, **kwargs)
        prefix = "model.layers" if "llama" in type(model).__name__.lower() else "model.decoder.layers"
        assert [s.name for s in sites] == [f"{prefix}.0.self_attn", f"{prefix}.1.self_attn"]
        for s in sites:
            assert s.reason == "" and s.form == impl
            q, k, v = (x.meta["example_value"] for x in (s.q, s.k, s.v))
            kv_heads = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else 4
            assert q.shape[1] == 4 and k.shape[1] == v.shape[1] == kv_heads    # repeat_kv undone
            assert s.v_layer.endswith("v_proj")
            if impl == "eager" or kwargs:
                assert s.mask is not None and not s.causal
            else:
                assert s.causal and s.mask is None


class _Attn(nn.Module):
    """q/k/v projections and one of the attention variants the rewrite must leave alone."""

    def __init__(self, variant: str, d: int = 32, heads: int = 2):
        super().__init__()
        self.variant, self.h = variant, heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.h, d // self.h).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.variant == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        if self.variant == "bmm":
            q3, k3, v3 = (t.reshape(b * self.h, s, -1) for t in (q, k, v))
            return torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)), dim=-1), v3)
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        if self.variant == "softcap":
            w = torch.tanh(w / 30.0) * 30.0
        if self.variant == "bias":
            w = w + torch.ones(s, s).tril().log() + torch.arange(s).float()[None, :]   # mask + ALiBi-like bias
        p = F.softmax(w, dim=-1, dtype=torch.float32)
        out = torch.matmul(p, v)
        return (out, p) if self.variant == "weights" else out


@pytest.mark.parametrize("variant,reason", [("dropout", "dropout in training"), ("softcap", "soft-capping"),
                                            ("bias", "besides the mask"), ("weights", "read elsewhere"),
                                            ("bmm", "3-D bmm"), ("plain", "")])
def test_variants_left_alone_with_their_reason(variant, reason):
    model = _Attn(variant).eval()
    sites = _sites(model, torch.randn(1, 6, 32))
    assert len(sites) == 1
    assert (reason in sites[0].reason) if reason else sites[0].reason == ""


def test_variants_read_from_the_module_config():
    assert "sliding-window" in variant_reason(None, MistralConfig(sliding_window=4096), 0)
    assert variant_reason(None, MistralConfig(sliding_window=None), 0) == ""
    q = Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, num_hidden_layers=2)
    assert "sliding-window" in variant_reason(None, q, 1) and variant_reason(None, q, 0) == ""
    gemma = GemmaConfig()
    gemma.attn_logit_softcapping = 50.0
    assert "soft-capping" in variant_reason(None, gemma, 0)
    assert "ALiBi" in variant_reason(None, BloomConfig(), 0)
    assert "ALiBi" in variant_reason(None, FalconConfig(alibi=True), 0)
    assert variant_reason(None, FalconConfig(alibi=False), 0) == ""


def test_sliding_window_layers_stay_in_float_and_explain_says_why():
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    plan = fq_compile.calibrate(model, batches(n=1, seq=12), Config(level="fp16", attention="int8"), progress=False)
    assert set(plan.attention) == {"model.layers.0.self_attn"}
    assert "sliding-window" in plan.attention_skipped["model.layers.1.self_attn"]
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        fast(torch.randint(0, VOCAB, (1, 12)))
    text = fq_compile.explain(fast)
    assert "model.layers.1.self_attn" in text and "sliding-window attention (window 8)" in text
    assert "fq.attention (Q.K^T int8, P.V int8)" in text
    note = " ".join(fq_compile.explain(fast).split())                   # wrapped at 120 characters
    assert "quantized attention is slower than PyTorch's SDPA on Hopper" in note       # issue 25, until it is not
    assert "slower than PyTorch's SDPA" in " ".join(fq_compile.explain(fast, full=True).split())
    assert max(map(len, text.splitlines())) <= 120


# ------------------------------------------------------------------------------------------------
# the rewritten model against an independent oracle
# ------------------------------------------------------------------------------------------------

def _oracle_attention(plan: QuantPlan, names: dict[int, str]):
    """A transformers attention function: float64 fake-quant attention with the plan's scales, written
    from the op's definition for one key block (the tests' sequences are shorter than kv_block)."""
    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        ap = plan.attention[names[id(module)]]
        rep = query.shape[1] // key.shape[1]

        def fq(x, s, fmt):
            s = s.double().to(x.device)[None, :, None, None]
            y = x.double() / s
            y = torch.round(y).clamp(-127, 127) if fmt == "int8" else y.clamp(-448, 448).float().to(
                torch.float8_e4m3fn).double()
            return y * s

        q = fq(query, ap.q_scale, ap.qk_format)
        k = fq(key, ap.k_scale, ap.qk_format).repeat_interleave(rep, 1)
        v = fq(value, ap.v_scale, ap.pv_format).repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        m, n = s.shape[-2:]
        if attention_mask is not None:
            s = (s + attention_mask.double() if attention_mask.dtype != torch.bool
                 else s.masked_fill(~attention_mask, -math.inf))
        else:
            s = s.masked_fill(~torch.ones(m, n, dtype=torch.bool).tril(), -math.inf)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = torch.round(p * 127) if ap.pv_format == "int8" else p.float().to(torch.float8_e4m3fn).double()
        out = (p @ v) / p.sum(-1, keepdim=True)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return attn


@pytest.mark.parametrize("kind,impl,fmt,level", [("llama", "sdpa", "int8", "fp16"), ("llama", "eager", "fp8", "O1"),
                                                  ("opt", "sdpa", "int8", "O1"), ("opt", "eager", "int8", "fp16")])
def test_quantized_attention_matches_fake_quant_oracle(kind, impl, fmt, level):
    model = (tiny_llama if kind == "llama" else tiny_opt)(layers=2)
    model.set_attn_implementation(impl)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level=level, attention=fmt), progress=False)
    assert len(plan.attention) == 2 and not plan.attention_skipped
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        code = reports(plan)[0].code
        assert code.count("torch.ops.fq.attention.default(") == 2
        assert "scaled_dot_product_attention" not in code and "softmax" not in code
        # the same linear plan, attention replaced by the oracle (float SDPA/eager as the baseline)
        linear_only = dataclasses.replace(plan, attention={}, config=Config.from_dict({**plan.config.to_dict(),
                                                                                      "attention": "fp"}))
        torch._dynamo.reset()
        base = torch.compile(model, backend="flattenquant", options={"plan": linear_only, "inductor": False})(x).logits
        names = {id(mod): n for n, mod in model.named_modules() if n in plan.attention}
        AttentionInterface.register("fq_oracle", _oracle_attention(plan, names))
        model.set_attn_implementation("fq_oracle")
        torch._dynamo.reset()
        ref = torch.compile(model, backend="flattenquant", options={"plan": linear_only, "inductor": False})(x).logits
        model.set_attn_implementation(impl)
    err, budget = _rel(y, ref), _rel(base, ref)
    assert budget > 1e-2                               # attention quantization is visible at all ...
    # ... and the op is the oracle's up to rounding: exp2q's 8.6e-5 (1% of a P step) and x * (1/s) vs
    # x / s move a P or a Q/K/V value by one step now and then (measured: <= 4% of the budget with float
    # linears; with O1's quantized linears downstream such a step can also flip an activation's rounding
    # in the next layer: <= 8%).  A wrong scale, head or mask costs about the whole budget.
    assert err < (0.1 if level == "fp16" else 0.2) * budget, (err, budget)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_plan_round_trip_keeps_attention(tmp_path):
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1", attention="fp8", attention_scales="head"),
                                progress=False)
    plan.save(tmp_path / "p.fqplan")
    loaded = QuantPlan.load(tmp_path / "p.fqplan")
    assert loaded.config == plan.config and set(loaded.attention) == set(plan.attention)
    for name, ap in plan.attention.items():
        lp = loaded.attention[name]
        assert (lp.qk_format, lp.pv_format, lp.kv_block, lp.layer_idx) == (ap.qk_format, ap.pv_format, ap.kv_block,
                                                                            ap.layer_idx)
        for key in ap.TENSORS:
            assert torch.equal(getattr(lp, key), getattr(ap, key))
    x = torch.randint(0, VOCAB, (1, 9))
    outs = []
    for p in (plan, loaded):
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(model, backend="flattenquant", options={"plan": p, "inductor": False})(x).logits)
    assert torch.equal(*outs)


def test_attention_needs_a_plan_for_its_heads():
    a, b = tiny_llama(layers=1, kv_heads=2), tiny_llama(layers=1, kv_heads=4)
    plan = fq_compile.calibrate(a, batches(n=1), Config(level="fp16", attention="int8"), progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kv heads"):
        fast = torch.compile(b, backend="flattenquant", options={"plan": plan, "inductor": False})
        fast(torch.randint(0, VOCAB, (1, 5)))


def test_attention_alone_at_fp16(model_kind):
    """OPT and Llama both work at the fp16 level with attention alone (no linear is quantized)."""
    model = (tiny_opt if model_kind == "opt" else tiny_llama)(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="fp16", attention="int8"), progress=False)
    assert not plan.layers and len(plan.attention) == 1
    torch._dynamo.reset()
    with torch.no_grad():
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
        fast(torch.randint(0, VOCAB, (1, 7)))
    code = reports(plan)[0].code
    assert "fq.attention.default" in code and "int8_linear" not in code


def test_v_quantized_in_the_graph_is_stored_keys_contiguous():
    """fq.attention reads a V quantized in the graph keys-contiguous (the layout the 8-bit tensor cores
    take for P.V: passes/attention.py `_keys_contiguous`): in the rewritten graph, V's quantize is followed
    by transpose -> contiguous -> transpose; the values are the oracle's either way (test above)."""
    import re

    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="fp16", attention="int8"), progress=False)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x)
    code = reports(plan)[0].code
    defs = dict(re.findall(r"^ +(\w+) = (.+?)(?:;|$)", code, flags=re.M))
    call = re.search(r"torch\.ops\.fq\.attention\.default\((\w+), (\w+), (\w+),", code)
    v = call.group(3)
    chain = []
    while v in defs and len(chain) < 4:
        chain.append(defs[v])
        v = re.match(r"(?:torch\.ops\.fq\.quantize_heads\.default\()?(\w+)", defs[v]).group(1)
    assert [c.split("(")[0].rsplit(".", 1)[-1] for c in chain] == ["transpose", "contiguous", "transpose", "default"], chain
    assert chain[0].endswith(".transpose(-1, -2)") and chain[2].endswith(".transpose(-1, -2)")
    assert chain[3].startswith("torch.ops.fq.quantize_heads.default(")
    # the layout is what the name says: stride 1 along the keys, the values unchanged
    t = torch.randint(-127, 128, (2, 4, 12, 8), dtype=torch.int8)
    kc = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert kc.stride(-2) == 1 and torch.equal(kc, t)
