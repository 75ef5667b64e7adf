"""Regional compilation (fq_compile/passes/regions.py): repeated blocks outlined into shared
invoke_subgraph bodies compute exactly what the whole graph computes, side effects (a static KV cache)
included; blocks that differ get no shared body; the backend falls back to the whole graph when Inductor
refuses the outlined one.

Most tests stand a recorder in for Inductor (`compile_fx` returns the graph it is given, run eagerly), so
they check the pass, not Inductor's numerics, in seconds; one runs Inductor on the CPU; the GPU test runs a
static-cache generate() under CUDA graphs."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch

import fq_compile
from fq_compile import Config
from fq_compile.passes.regions import assign_blocks, outline_blocks
from fq_compile.runtime.state import reports
from fq_compile.tools.synthetic import synthetic_plan
from tests.conftest import VOCAB, batches, tiny_opt

HOP = torch.ops.higher_order.invoke_subgraph


def _model_and_plan(layers=3, level="O1", seed=0):
    model = tiny_opt(layers=layers, seed=seed)
    plan = synthetic_plan(model, level, flatten_ratio=0.2, progress=False)
    return model, plan


def _compiled(model, plan, regions: bool):
    torch._dynamo.reset()
    return torch.compile(model, backend="flattenquant", options={"plan": plan, "regions": regions,
                                                                 "free_weights": False})


def _logits(model, plan, ids, regions: bool):
    with torch.no_grad():
        return _compiled(model, plan, regions)(ids, use_cache=False).logits


def _generate(model, plan, ids, regions: bool, steps: int):
    """Greedy tokens of a static-cache generate() (the cache's tensors updated in place in every block)."""
    with torch.no_grad():
        return _compiled(model, plan, regions).generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                                        pad_token_id=1, cache_implementation="static")


def _bodies(gm) -> list[str]:
    return [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is HOP]


def test_same_blocks_share_one_body_and_compute_the_same_bits(recorded):
    model, plan = _model_and_plan(layers=3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    whole = _logits(model, plan, ids, regions=False)
    assert not _bodies(recorded[-1])
    outlined = _logits(model, plan, ids, regions=True)
    calls = _bodies(recorded[-1])
    assert calls == ["fq_block_0"] * 3, calls                     # every block calls the one body
    assert torch.equal(outlined, whole)
    assert "3 of 3 blocks outlined into 1 compiled body" in reports(plan)[-1].regions
    assert "regional compilation" in fq_compile.explain(plan)          # explain() says it too
    body = recorded[-1].fq_block_0
    ops = {n.target for n in body.graph.nodes if n.op == "call_function"}
    assert any(getattr(t, "namespace", None) == "fq" for t in ops), ops          # our ops are in the body
    assert not [n for n in body.graph.nodes if n.op == "get_attr"]   # the plan's tensors are operands


def test_static_cache_updates_inside_the_body(recorded):
    """generate() with a static cache: each block's in-place cache update runs inside the shared body,
    on that block's cache; the tokens are those of the whole graph."""
    model, plan = _model_and_plan(layers=2)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    whole = _generate(model, plan, ids, regions=False, steps=5)
    outlined = _generate(model, plan, ids, regions=True, steps=5)
    assert any(_bodies(g) for g in recorded)
    assert torch.equal(outlined, whole)


def test_blocks_that_differ_get_no_shared_body(recorded):
    """Without block alignment a calibrated plan flattens each layer by its own data: K' differs from
    block to block, so no two blocks are the same program on same-shaped operands: nothing is outlined."""
    model = tiny_opt(layers=2, seed=0)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_budget=0.0), progress=False)
    sizes = [plan.groups[g].cmap.size for g in sorted(plan.groups) if ".0." in g or ".1." in g]
    assert len(set(sizes)) > 1                                     # the premise: K' differs
    _logits(model, plan, torch.randint(0, VOCAB, (1, 8)), regions=True)
    assert not _bodies(recorded[-1])
    assert "no two of 2 blocks" in reports(plan)[-1].regions


def test_aligned_calibrated_plan_shares_one_body(recorded):
    """With block alignment at a budget that allows one set of widths, both blocks
    call one body, and the logits are bit for bit those of the unaligned plan (zero columns add nothing
    to an integer product)."""
    model = tiny_opt(layers=2, seed=0)
    unaligned = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_budget=0.0), progress=False)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1", align_budget=100.0), progress=False)
    assert "2 blocks padded to 1 set of K'" in plan.calibration["align"]
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    reference = _logits(model, unaligned, ids, regions=False)
    outlined = _logits(model, plan, ids, regions=True)
    assert _bodies(recorded[-1]) == ["fq_block_0"] * 2
    assert torch.equal(outlined, reference)


def test_assign_blocks_puts_inserted_nodes_with_their_users():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    q = g.call_function(torch.neg, (x,))                 # "ours": no stack
    a = g.call_function(torch.relu, (q,))
    a.meta["nn_module_stack"] = {"m": ("L['self'].layers.0", object)}
    b = g.call_function(torch.relu, (a,))
    b.meta["nn_module_stack"] = {"m": ("L['self'].layers.1", object)}
    top = g.call_function(torch.neg, (b,))               # model-level code: a stack without a number
    top.meta["nn_module_stack"] = {"m": ("L['self']", object)}
    g.output(top)
    blocks = assign_blocks(g, inserted={q})
    assert blocks == {q: 0, a: 0, b: 1}


def test_interleaved_block_stays_inline():
    """A node outside a block that reads the block's value before the block's last node: no call can
    replace the block without reordering, so the block is left as it is."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.zeros(4)

    def node(fn, args, block):
        n = g.call_function(fn, args)
        if block is not None:
            n.meta["nn_module_stack"] = {"m": (f"L['self'].layers.{block}", object)}
        return n

    a0 = node(torch.relu, (x,), 0)
    side = node(torch.neg, (a0,), None)                  # outside, between block 0's nodes
    side.meta["nn_module_stack"] = {}
    b0 = node(torch.add, (a0, side), 0)
    a1 = node(torch.relu, (b0,), 1)
    b1 = node(operator.add, (a1, a1), 1)
    g.output(b1)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    new, report = outline_blocks(gm, inserted=set())
    assert report.skipped["0"] == "neg reads relu between the block's nodes"
    assert new is gm and report.outlined == 0


def test_block_reading_a_value_stays_inline():
    """A block that turns a tensor into a Python number (x.item(): Dynamo's lifted float attributes under
    dynamic=True) cannot be traced as a body on fake operands: the blocks stay inline, with the reason."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.zeros(4)
    eps = [g.placeholder(f"eps{i}") for i in range(2)]
    for e in eps:
        e.meta["val"] = torch.zeros(())
    h = x
    for i in range(2):
        item = g.call_method("item", (eps[i],))
        r = g.call_function(torch.relu, (h,))
        h = g.call_function(torch.add, (r, item))
        for n in (item, r, h):
            n.meta["nn_module_stack"] = {"m": (f"L['self'].layers.{i}", object)}
    g.output(h)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    new, report = outline_blocks(gm, inserted=set())
    assert new is gm and report.outlined == 0
    assert all("reads a tensor's value as a Python number" in why for why in report.skipped.values())
    assert len(report.skipped) == 2


def test_fallback_to_the_whole_graph(monkeypatch):
    """Where Inductor refuses the outlined graph, the backend warns and compiles the graph whole."""
    import torch._inductor.compile_fx as cfx

    def picky(gm, example_inputs, config_patches=None):
        if _bodies(gm):
            raise RuntimeError("invoke_subgraph: not supported here")
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", picky)
    model, plan = _model_and_plan(layers=2)
    ids = torch.randint(0, VOCAB, (1, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _logits(model, plan, ids, regions=True)
    assert any("regional compilation failed" in str(w.message) for w in caught)
    assert reports(plan)[-1].regions == "regional compilation: failed, compiled whole"
    assert torch.equal(out, _logits(model, plan, ids, regions=False))


def test_inductor_compiles_the_outlined_graph():
    """Inductor itself (CPU) on the outlined graph: it compiles, and gives the whole graph's logits."""
    model, plan = _model_and_plan(layers=2, seed=1)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    outlined = _logits(model, plan, ids, regions=True)
    assert "2 of 2 blocks outlined" in reports(plan)[-1].regions
    whole = _logits(model, plan, ids, regions=False)
    torch.testing.assert_close(outlined, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_generate_with_outlined_blocks():
    """The decode path on the device's torch: a static-cache generate() of a 3-block model whose blocks share
    one body, under CUDA graphs (the cache updated in place inside the body), gives the whole graph's
    tokens; the body was compiled, not the fallback."""
    model = tiny_opt(layers=3, seed=0).cuda()
    plan = synthetic_plan(model, "O1", flatten_ratio=0.2, progress=False)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4)).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)        # no fallback
        outlined = _generate(model, plan, ids, regions=True, steps=6)
    assert any("outlined into 1 compiled body" in r.regions for r in reports(plan)), [r.regions for r in reports(plan)]
    assert torch.equal(outlined, _generate(model, plan, ids, regions=False, steps=6))
