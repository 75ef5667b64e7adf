"""runtime/guards.py: a compiled model never silently computes something else than its plan.

Dynamo's recompile limit (a frame that needs more graphs than the limit runs eagerly, in floating
point) and in-place changes of quantized weights after compile (the graph keeps the plan's old
integer copies) must each give the plan's output or a clear error."""

import copy

import pytest
import torch

import fq_compile
from fq_compile import Config, PlanMismatchError, RecompileLimitError
from fq_compile.runtime.guards import fingerprint, remove_eager_guards
from fq_compile.runtime.state import reports
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt

# ordinary calls: batch 1 / 2 / 4, a prompt and a single token, with and without an attention mask
CALLS = [(1, 6, False), (1, 6, True), (1, 1, False), (1, 1, True), (1, 9, False), (1, 9, True), (2, 6, False),
         (2, 6, True), (2, 1, False), (4, 1, True)]


def _inputs(calls, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, s, mask in calls:
        x = torch.randint(0, VOCAB, (b, s), generator=g)
        out.append((x, {"attention_mask": torch.ones_like(x)} if mask else {}))
    return out


def _no_flags():
    return getattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False) is False


@pytest.fixture(scope="module")
def llama_plan():
    torch._dynamo.reset()
    model = tiny_llama(layers=1)
    return model, fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)


def test_recompile_limit_raises_instead_of_running_in_floating_point(llama_plan):
    """The issue's scenario, at Dynamo's default settings: from the 9th graph on Dynamo stops
    compiling this frame; each call gives exactly what the plan's reference path gives, or raises
    RecompileLimitError saying what to do -- never the floating-point logits."""
    model, plan = llama_plan
    inputs = _inputs(CALLS)
    with torch.no_grad():
        fp32 = [model(x, **kw).logits for x, kw in inputs]
        with torch._dynamo.config.patch(recompile_limit=64):       # the reference: room for every shape
            ref = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False},
                                dynamic=True)
            expect = [ref(x, **kw).logits for x, kw in inputs]
        torch._dynamo.reset()
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
        results = []
        for (x, kw), e, f in zip(inputs, expect, fp32):
            try:
                out = fast(x, **kw).logits
            except RecompileLimitError as err:
                assert "recompile_limit" in str(err) and "dynamic=True" in str(err)
                results.append("error")
                continue
            assert torch.equal(out, e) and not torch.allclose(out, f)
            results.append("quantized")
        assert results[:8] == ["quantized"] * 8 and "error" in results, results
        # the remedy the message names: room for more graphs (from fresh caches: Dynamo does not retry)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=64):
            i = results.index("error")
            assert torch.equal(fast(inputs[i][0], **inputs[i][1]).logits, expect[i])
    assert _no_flags()


def test_dynamic_shapes_keep_generation_within_a_few_graphs(llama_plan):
    """dynamic=True: prefill and decode with a KV cache at batch 1, 2 and 4 need 4 graphs (batch 1
    and prompt length 1 are specialised by Dynamo), well under the limit of 8."""
    model, plan = llama_plan
    graphs = len(reports(plan))
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False}, dynamic=True)
    with torch.no_grad():
        for b, prompt in ((1, 7), (2, 5), (4, 9), (2, 3)):
            x = torch.randint(0, VOCAB, (b, prompt))
            out = fast(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
            mask = torch.ones(b, prompt + 1, dtype=torch.long)
            nxt = out.logits[:, -1:].argmax(-1)
            fast(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert len(reports(plan)) - graphs <= 4, len(reports(plan)) - graphs


def test_a_second_compiled_model_past_the_limit_raises(llama_plan):
    """Compiled models of one class share Dynamo's limit per function: a second model (with its
    own plan) may never get a graph of its own, and its layers then run eagerly.  Calibration
    guarded its layers, so it raises instead."""
    model, plan = llama_plan
    other = tiny_llama(layers=1, seed=4)
    other_plan = fq_compile.calibrate(other, batches(n=1), Config(level="O1"), progress=False)
    torch._dynamo.reset()                 # calibration's graphs count towards the limit as well
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        with pytest.raises(RecompileLimitError, match="was about to run un-quantized"):
            torch.compile(other, backend="flattenquant", options={"plan": other_plan, "inductor": False})(x)
    with torch.no_grad():
        assert not torch.allclose(a, model(x).logits)
        other(x)                       # called directly (not compiled) the model still runs eagerly


def test_a_graph_reused_for_another_instance_checks_its_weights(llama_plan):
    """torch.compile of a copy with the same plan reuses the first copy's graphs (Dynamo does not
    guard on parameter identity): right for equal weights, refused for other ones."""
    model, plan = llama_plan
    twin = copy.deepcopy(model)
    x = torch.randint(0, VOCAB, (2, 6))
    opts = {"plan": plan, "inductor": False}
    graphs = len(reports(plan))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options=opts)(x).logits
        assert torch.equal(torch.compile(twin, backend="flattenquant", options=opts)(x).logits, a)
        assert len(reports(plan)) == graphs + 1
        twin.model.layers[0].mlp.down_proj.weight[0, :4] *= -1
        with pytest.raises(PlanMismatchError, match=r"down_proj\.weight: the weights differ"):
            torch.compile(twin, backend="flattenquant", options=opts)(x)


def test_other_backends_and_eager_calls_are_not_affected(llama_plan):
    """The guards act only inside code compiled by flattenquant: a calibrated model compiled with
    another backend falls back to eager at its limit as Dynamo does, and runs eagerly."""
    model, _ = llama_plan
    inputs = _inputs([(1, 6, False), (2, 6, True)])
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        other = torch.compile(model, backend="eager")
        for x, kw in inputs:
            assert torch.equal(other(x, **kw).logits, model(x, **kw).logits)


def test_eager_on_recompile_stance_raises(llama_plan):
    model, plan = llama_plan
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        fast(torch.randint(0, VOCAB, (2, 6)))
        with torch.compiler.set_stance("eager_on_recompile"):
            with pytest.raises(RecompileLimitError):
                fast(torch.randint(0, VOCAB, (1, 1)))


def test_calibration_that_reaches_no_observer_is_refused():
    model = tiny_opt(layers=1)
    data = [torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (1, 1))]
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(fq_compile.CalibrationError, match="batch 1 ran without reaching any observer"):
            fq_compile.calibrate(model, data, Config(level="w8a8"), progress=False)


def test_calibration_refuses_training_mode():
    model = tiny_opt(layers=1).train()
    with pytest.raises(fq_compile.CalibrationError, match=r"training mode.*model\.eval\(\)"):
        fq_compile.calibrate(model, batches(n=1), Config(level="w8a8"), progress=False)


# -- stale weights ------------------------------------------------------------------------------------

@pytest.fixture
def compiled_opt():
    torch._dynamo.reset()
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = fast(x).logits
    return model, plan, fast, x, before


@pytest.mark.parametrize("change", ["mul_", "zero_", "bias", "norm", "load_state_dict"])
def test_in_place_changes_after_compile_raise_saying_to_recalibrate(compiled_opt, change):
    model, plan, fast, x, before = compiled_opt
    layer = model.model.decoder.layers[0]
    other = tiny_opt(layers=1, seed=3)
    with torch.no_grad():
        if change == "mul_":
            layer.self_attn.q_proj.weight.mul_(2.0)
        elif change == "zero_":
            layer.fc2.weight.zero_()
        elif change == "bias":
            layer.fc1.bias.add_(0.5)
        elif change == "norm":        # folded into a graph constant at compile time
            layer.self_attn_layer_norm.weight.mul_(1.5)
        else:
            model.load_state_dict(other.state_dict())
        with pytest.raises(PlanMismatchError, match="weights differ.*recalibrate"):
            fast(x)
        with pytest.raises(Exception, match="weights differ.*recalibrate"):
            fast(torch.randint(0, VOCAB, (3, 11)))         # a new shape (a recompile) says the same


def test_unchanged_values_pass_and_restored_weights_run_again(compiled_opt):
    model, plan, fast, x, before = compiled_opt
    w = model.model.decoder.layers[0].fc1.weight
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        w.mul_(1.0)                                   # a new version, the same values: no error
        assert torch.equal(fast(x).logits, before)
        w.mul_(-1.0)                                   # same sum of |W|, other weights
        with pytest.raises(PlanMismatchError, match=r"fc1\.weight"):
            fast(x)
        model.load_state_dict(saved)
        assert torch.equal(fast(x).logits, before)


def test_checked_once_checks_each_graph_at_its_first_call_in_the_scope(compiled_opt, monkeypatch):
    """Inside one checked_once() scope a guard checks on its first call only (the decode steps of one
    generate()); the next scope, and every call outside one, checks again: a change made inside a scope
    raises at the first call after it."""
    from fq_compile.runtime import guards

    model, plan, fast, x, before = compiled_opt
    picks = []
    call = guards.WeightGuard.__call__

    def counting(self, *args):            # a call checks unless it is in the scope the guard last checked in
        scope = guards._SCOPE.get()
        if scope is None or scope is not self.scope:
            picks.append(1)
        return call(self, *args)

    monkeypatch.setattr(guards.WeightGuard, "__call__", counting)
    w = model.model.decoder.layers[0].fc1.weight
    with torch.no_grad():
        with guards.checked_once():
            for _ in range(3):
                assert torch.equal(fast(x).logits, before)
            assert len(picks) == 1, picks          # one graph, checked once in three calls
            w.mul_(-1.0)                           # inside the scope: not seen until the scope ends
            fast(x)
        with pytest.raises(PlanMismatchError, match=r"fc1\.weight"):
            fast(x)
        with guards.checked_once(), pytest.raises(PlanMismatchError, match=r"fc1\.weight"):
            fast(x)                                # a new scope checks at its first call
        w.mul_(-1.0)
        assert torch.equal(fast(x).logits, before)


def test_generate_checks_the_weights_once_per_call():
    """fast.generate() opens one checked_once() scope per call: a weight changed between two calls
    raises at the second; within a call the guard checks at the first forward only."""
    from fq_compile.runtime import guards

    torch._dynamo.reset()
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=1)
    checks = []
    recheck = guards.WeightGuard.__call__

    def spy(self, *args):
        checks.append(guards._SCOPE.get() is not None and guards._SCOPE.get() is self.scope)
        return recheck(self, *args)

    with torch.no_grad():
        fast.generate(ids, **kw)
        guards.WeightGuard.__call__ = spy
        try:
            fast.generate(ids, **kw)
        finally:
            guards.WeightGuard.__call__ = recheck
        assert checks and checks.count(False) <= 2 and checks.count(True) >= 2, checks   # prefill + 1st step
        model.model.decoder.layers[0].fc1.weight.mul_(-1.0)
        with pytest.raises(PlanMismatchError, match=r"fc1\.weight"):
            fast.generate(ids, **kw)


def test_a_plan_for_weights_with_entries_negated_is_refused():
    """sum|W| cannot tell these apart; the fingerprint can (any single element)."""
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="w8a8"), progress=False)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.v_proj.weight[3, 7] *= -1
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"v_proj\.weight: the weights differ"):
        torch.compile(twin, backend="flattenquant", options={"plan": plan, "inductor": False})(
            torch.randint(0, VOCAB, (1, 5)))


def test_fingerprint_is_exact_and_cached():
    w = torch.randn(70, 130)
    fp = fingerprint(w)
    assert fp.startswith("float32[70,130]:") and fingerprint(w) == fp
    for i in (0, 4095, 4096, w.numel() - 1):         # both sides of the internal row length, the tail
        v = w.clone()
        v.view(-1)[i] *= -1
        assert fingerprint(v) != fp
    w.view(-1)[17] += 1.0                              # in place: the cache follows the version counter
    assert fingerprint(w) != fp
    assert fingerprint(w.to(torch.bfloat16)).startswith("bfloat16[70,130]:")
    assert fingerprint(torch.ones(3, dtype=torch.float16)) != fingerprint(torch.ones(3, dtype=torch.bfloat16))


def test_remove_eager_guards(llama_plan):
    model, plan = llama_plan
    twin = copy.deepcopy(model)                       # copies carry the guards calibrate installed
    assert remove_eager_guards(twin) == len(plan.layers)
    assert remove_eager_guards(twin) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fingerprint_is_the_same_on_cuda():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(300, 4100).to(dtype)
        assert fingerprint(w.cuda()) == fingerprint(w)
