"""passes/siblings.py: sibling linears (q/k/v, gate/up) as one GEMM over concatenated weights.  The fused
graph must compute the unfused graph's bits (CPU reference kernels here; CUDA in the gpu test) with fewer
GEMM calls, and fuse only layers that can share a GEMM."""

from __future__ import annotations

import re

import pytest
import torch

import fq_compile
from fq_compile import Config
from fq_compile.runtime.state import reports
from fq_compile.tools import synthetic
from fq_compile.tools.synthetic import synthetic_plan
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt

_GEMM = re.compile(r"torch\.ops\.fq\.(?:int8_linear|int4_linear|flat_linear|fp8_linear|w4a8_linear)\.default\(")
HOP = torch.ops.higher_order.invoke_subgraph
_GEMM_OPS = (torch.ops.fq.int8_linear.default, torch.ops.fq.int4_linear.default, torch.ops.fq.flat_linear.default)


def _ids(seq: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _run(model, plan, x, **options):
    """Logits through the backend without Inductor (the reference ops), and the last graph's report."""
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False, **options})
    with torch.no_grad():
        out = fast(x).logits
    return out, reports(plan)[-1]


def _gemms(report) -> int:
    return len(_GEMM.findall(report.code))


def _fused(report) -> dict[str, str]:
    return {lr.layer: lr.fused for lr in report.layers if lr.fused}


@pytest.mark.parametrize("make, per_block", [(tiny_opt, 6), (tiny_llama, 7)])
@pytest.mark.parametrize("seq", [1, 40])          # decode-sized (fq.flat_linear) and prefill (quantize + GEMM)
def test_fused_equals_unfused_bit_for_bit_with_fewer_gemms(make, per_block, seq):
    model = make(layers=2)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    x = _ids(seq, batch=2)
    off, r_off = _run(model, plan, x, fuse_siblings=False)
    on, r_on = _run(model, plan, x)
    assert torch.equal(on, off)
    assert _gemms(r_off) == 2 * per_block
    # q/k/v -> 1 in every block; Llama's gate/up -> 1 as well
    assert _gemms(r_on) == 2 * (per_block - 2 - (make is tiny_llama))
    fused = {n.split("layers.", 1)[1]: label for n, label in _fused(r_on).items()}
    want = {f"{b}.self_attn.{p}_proj": "q_proj+k_proj+v_proj" for b in (0, 1) for p in "qkv"}
    if make is tiny_llama:
        want.update({f"{b}.mlp.{p}_proj": "gate_proj+up_proj" for b in (0, 1) for p in ("gate", "up")})
    assert fused == want
    assert not any(lr.fused for lr in r_off.layers)
    assert len(r_on.layers) == len(r_off.layers)                      # every layer keeps its row
    assert "[fused: q_proj+k_proj+v_proj]" in fq_compile.explain(plan, full=True)


def test_plan_weights_are_held_once_and_the_plan_still_saves(tmp_path):
    """On the plan's own device the layers' weights become rows of the concatenation (no second copy);
    a second graph finds them so and reuses it; the plan saves and loads the same values."""
    model = tiny_opt(layers=1)
    plan = synthetic_plan(model, "O1", flatten_ratio=0.2, progress=False)
    names = [f"model.decoder.layers.0.self_attn.{p}_proj" for p in "qkv"]
    before = {n: plan.layers[n].weight_q.clone() for n in plan.layers}
    _run(model, plan, _ids(3))
    wq = [plan.layers[n].weight_q for n in names]
    assert len({w.untyped_storage().data_ptr() for w in wq}) == 1
    whole = wq[0]._base
    assert whole.shape[0] == sum(w.shape[0] for w in wq)
    _run(model, plan, _ids(20))                                           # another graph: the same tensor
    assert all(plan.layers[n].weight_q._base is whole for n in names)
    assert all(torch.equal(plan.layers[n].weight_q, before[n]) for n in plan.layers)
    plan.save(tmp_path / "p.fqplan")
    loaded = fq_compile.QuantPlan.load(tmp_path / "p.fqplan")
    assert all(torch.equal(loaded.layers[n].weight_q, before[n]) for n in plan.layers)


def _mixed_bits_plan(model):
    """O1 plan with the first block's q_proj (and, bias or not, only it) in INT4: k/v stay INT8."""
    plan = synthetic_plan(model, "O1", flatten_ratio=0.2, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    lp, g = plan.layers[name], plan.groups[plan.layers[name].group]
    params = dict(model.named_parameters())
    plan.layers[name] = synthetic._layer_plan(name, params[name + ".weight"], None, g, g, "int4", None, plan.config,
                                              lp.rows_folded_from)
    return plan


@pytest.mark.parametrize("seq", [1, 40])
def test_mixed_bits_group_fuses_only_equal_layers(seq):
    model = tiny_llama(layers=1)
    plan = _mixed_bits_plan(model)
    x = _ids(seq, batch=2)
    off, _ = _run(model, plan, x, fuse_siblings=False)
    on, report = _run(model, plan, x)
    assert torch.equal(on, off)
    fused = _fused(report)
    assert "model.layers.0.self_attn.q_proj" not in fused
    assert fused["model.layers.0.self_attn.k_proj"] == fused["model.layers.0.self_attn.v_proj"] == "k_proj+v_proj"
    assert _gemms(report) == 7 - 1 - 1          # k+v and gate+up share; the INT4 q alone


def test_auto_formats_fuse_only_integer_layers():
    """Level auto: e4m3 layers (fp8, w4a8) stay one GEMM each (float accumulation), INT8 siblings fuse."""
    model = tiny_llama(layers=4)
    plan = synthetic_plan(model, "auto", flatten_ratio=0.2, format_shares={"fp8": 0.25, "w4a8": 0.25, "int8": 0.5},
                          progress=False)
    x = _ids(20, batch=2)
    off, _ = _run(model, plan, x, fuse_siblings=False)
    on, report = _run(model, plan, x)
    assert torch.equal(on, off)
    fused = _fused(report)
    formats = {plan.layers[n].format for n in fused}
    assert formats == {"int8"}
    e4m3 = [n for n, lp in plan.layers.items() if lp.format in ("fp8", "w4a8") and n.endswith(("k_proj", "up_proj"))]
    assert e4m3 and not set(e4m3) & set(fused)


def test_option_and_env_switch(monkeypatch):
    model = tiny_opt(layers=1)
    plan = synthetic_plan(model, "O1", flatten_ratio=0.2, progress=False)
    assert _fused(_run(model, plan, _ids(4))[1])
    assert not _fused(_run(model, plan, _ids(4), fuse_siblings=False)[1])
    monkeypatch.setenv("FQ_FUSE_SIBLINGS", "0")
    assert not _fused(_run(model, plan, _ids(4))[1])
    assert _fused(_run(model, plan, _ids(4), fuse_siblings=True)[1])         # the option wins over the env
    with pytest.raises(Exception, match="fuse_siblings"):
        _run(model, plan, _ids(4), fuse_siblings="yes")


def test_fused_blocks_outline_into_one_shared_body(recorded):
    """Regional compilation after the fusion: every block calls one body holding the fused GEMM, and the
    logits are those of the unfused, un-outlined graph."""
    model = tiny_opt(layers=3)
    plan = synthetic_plan(model, "O1", flatten_ratio=0.2, progress=False)
    x = _ids(12, batch=2)
    outs = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="flattenquant",
                             options={"plan": plan, "free_weights": False, "fuse_siblings": fuse})
        with torch.no_grad():
            outs[fuse] = fast(x, use_cache=False).logits
    gm = recorded[-1]
    calls = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is HOP]
    assert calls == ["fq_block_0"] * 3, calls
    assert "3 of 3 blocks outlined into 1 compiled body" in reports(plan)[-1].regions
    body = gm.fq_block_0
    gemms = [n for n in body.graph.nodes if n.op == "call_function" and n.target in _GEMM_OPS]
    narrows = [n for n in body.graph.nodes if n.op == "call_function" and n.target is torch.narrow]
    assert len(gemms) == 4 and len(narrows) == 3            # q/k/v in one GEMM, out_proj, fc1, fc2
    assert torch.equal(outs[True], outs[False])


def test_generate_greedy_tokens_equal_on_and_off():
    model = tiny_llama(layers=2)
    plan = synthetic_plan(model, "O2", flatten_ratio=0.2, int4_share=0.5, progress=False)
    prompt = _ids(7)
    tokens = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        n = len(reports(plan))
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False,
                                                                     "fuse_siblings": fuse})
        with torch.no_grad():
            tokens[fuse] = fast.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert any(lr.fused for r in reports(plan)[n:] for lr in r.layers) == fuse       # it ran through us
    assert torch.equal(tokens[True], tokens[False])


def test_attention_rewrite_reads_the_fused_slices():
    """Quantized attention (Config.attention) finds its q/k/v before the linears are lowered; with them
    fused it reads the GEMM's slices and computes the same bits."""
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1", attention="int8"), progress=False)
    assert plan.attention
    x = _ids(16, batch=2)
    off, _ = _run(model, plan, x, fuse_siblings=False)
    on, report = _run(model, plan, x)
    assert torch.equal(on, off)
    assert report.attention and all(a.op.startswith("fq.attention") for a in report.attention)
    assert _fused(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_gpu_fused_equals_unfused_bit_for_bit(make):
    """On CUDA through Inductor (GPU GEMM kernels, regions on, deterministic so that Inductor's own
    float kernels are chosen alike): prefill and decode-sized logits, fused and unfused, are equal."""
    model = make(hidden=128, layers=2).to("cuda", torch.float16)
    data = [b.cuda() for b in batches(n=2)]
    plan = fq_compile.calibrate(model, data, Config(level="O2"), progress=False)
    assert {lp.bits for lp in plan.layers.values()} == {4, 8}
    outs = {}
    for fuse in (False, True):
        for seq in (1, 48):
            torch._dynamo.reset()
            fast = torch.compile(model, backend="flattenquant", options={
                "plan": plan, "free_weights": False, "deterministic": True, "fuse_siblings": fuse})
            with torch.no_grad():
                outs[fuse, seq] = fast(_ids(seq, batch=2).cuda()).logits
            assert any(lr.fused for lr in reports(plan)[-1].layers) == fuse
    for seq in (1, 48):
        assert torch.equal(outs[True, seq], outs[False, seq]), seq
