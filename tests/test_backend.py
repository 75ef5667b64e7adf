"""End to end: calibrate -> torch.compile(backend="flattenquant") on tiny OPT and Llama."""

import subprocess
import sys

import pytest
import torch

import fq_compile
from fq_compile import CalibrationError, Config, PlanMismatchError
from fq_compile.runtime.state import reports
from tests.conftest import VOCAB, batches, break_graph_inside, tiny_llama, tiny_opt

LEVELS = ["fp16", "w8a8", "smoothquant", "O1", "O2", "O3"]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _quantized_logits(model, x, data, config, inductor=True):
    """Calibrate `model` on `data` with `config` from fresh Dynamo caches, compile, run on x."""
    torch._dynamo.reset()
    plan = fq_compile.calibrate(model, data, config, progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": inductor})
    return fast(x).logits, plan


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_compiles_and_matches_the_reference_path(make_model, level):
    model = make_model()
    plan = fq_compile.calibrate(model, batches(), Config(level=level), progress=False)
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref32 = model(x).logits
        out = torch.compile(model, backend="flattenquant", options={"plan": plan})(x).logits
        torch._dynamo.reset()
        eager = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
    assert out.shape == ref32.shape and torch.isfinite(out).all()
    # Inductor runs the same integer ops; only float rounding around them may differ
    assert _rel(out, eager) < 1e-4
    if level == "fp16":
        assert _rel(out, ref32) < 1e-5
    else:
        assert 0 < _rel(out, ref32) < 0.5
        assert len(plan.layers) > 0


def test_flattening_beats_naive_w8a8_on_planted_outliers(make_model):
    model = make_model(hidden=128)
    x = torch.randint(0, VOCAB, (2, 48))
    errs = {}
    with torch.no_grad():
        ref = model(x).logits
        for level in ("w8a8", "O1"):
            errs[level] = _rel(_quantized_logits(model, x, batches(n=6), Config(level=level))[0], ref)
    # several times smaller: fails if flattening did nothing (O1 without flattening is ~W8A8)
    assert errs["O1"] * 3 < errs["w8a8"], errs


def test_fold_sites_are_exact_in_floating_point(make_model):
    """Apply each fold the analysis chose to a float copy of the model (producer / s, consumer
    columns * s): the model's function must not change.  A wrong site (e.g. folding through
    grouped-query attention or a non-commuting op) changes the logits by far more than 1e-4."""
    import copy

    model = make_model(kv_heads=4) if make_model is tiny_llama else make_model()
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1"), progress=False)
    smoothed = copy.deepcopy(model)
    params = dict(smoothed.named_parameters())
    kinds = set()
    with torch.no_grad():
        for g in plan.groups.values():
            s = g.smooth
            kind, _, target = g.fold.partition(":")
            kinds.add(kind)
            if kind == "op":
                continue
            for layer in g.layers:
                params[layer + ".weight"].mul_(s[None, :])
            if kind == "norm":
                for fqn in target.split(","):
                    params[fqn].div_(s)
            else:
                params[target + ".weight"].div_(s[:, None])
                if target + ".bias" in params:
                    params[target + ".bias"].div_(s)
        x = torch.randint(0, VOCAB, (2, 20))
        assert _rel(smoothed(x).logits, model(x).logits) < 1e-4
    assert kinds >= {"norm", "rows"}


def test_folding_stays_within_quantization_error(make_model):
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 20))
    outs = {}
    with torch.no_grad():
        ref = model(x).logits
        for fold in (True, False):
            outs[fold], plan = _quantized_logits(model, x, batches(), Config(level="O1", fold=fold), inductor=False)
            assert all(g.fold == "op" for g in plan.groups.values()) != fold
    # a row fold changes the producer's own per-tensor rounding, so the two differ by quantization
    # noise; a wrong fold would differ by far more
    assert _rel(outs[True], outs[False]) < _rel(outs[False], ref)
    assert _rel(outs[True], ref) < 0.5


def _fold_kinds(plan):
    return {name.rsplit(".", 1)[-1].split("+")[0]: g.fold.split(":")[0] for name, g in plan.groups.items()}


def _no_cache(data):
    return [{"input_ids": b, "use_cache": False} for b in data]


def test_fold_sites_per_architecture():
    opt = fq_compile.calibrate(tiny_opt(), _no_cache(batches(n=1)), Config(level="O1"), progress=False)
    assert _fold_kinds(opt) == {"q_proj": "norm", "out_proj": "rows", "fc1": "norm", "fc2": "rows"}
    torch._dynamo.reset()
    for kv_heads, attn_fold in ((2, "op"), (4, "rows")):   # GQA cannot fold into v_proj; MHA can
        llama = fq_compile.calibrate(tiny_llama(kv_heads=kv_heads), _no_cache(batches(n=1)), Config(level="O1"),
                                     progress=False)
        folds = _fold_kinds(llama)
        assert folds == {"q_proj": "norm", "o_proj": attn_fold, "gate_proj": "norm", "down_proj": "rows"}, folds
        torch._dynamo.reset()


def test_kv_cache_returned_to_the_caller_keeps_the_attention_smoothing_in_the_op():
    """With use_cache=True the values V go into past_key_values: folding s into v_proj would hand
    the caller V / s, so the graphs calibration sees keep s in o_proj's quantize op."""
    plan = fq_compile.calibrate(tiny_llama(kv_heads=4), batches(n=1), Config(level="O1"), progress=False)
    attn = next(g for name, g in plan.groups.items() if name.endswith("o_proj"))
    assert attn.fold == "op" and "KV cache" in attn.fold_note, (attn.fold, attn.fold_note)
    assert _fold_kinds(plan)["down_proj"] == "rows"


def test_dynamic_sequence_lengths_do_not_recompile_per_length(make_model):
    model = make_model()
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1"), progress=False)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    with torch.no_grad():
        # Dynamo's automatic-dynamic: one static graph, then one recompile per dimension that changes
        for b, s in ((2, 7), (2, 13), (3, 21)):
            fast(torch.randint(0, VOCAB, (b, s)))
        assert len(reports(plan)) <= 3
        warm = len(reports(plan))
        for b, s in ((4, 30), (2, 45), (3, 64), (2, 99), (5, 17)):
            x = torch.randint(0, VOCAB, (b, s))
            assert _rel(fast(x).logits, model(x).logits) < 0.5
    assert len(reports(plan)) == warm             # no recompile per length or batch


def test_explain_and_dump(tmp_path, model_kind):
    model = tiny_opt() if model_kind == "opt" else tiny_llama()
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O2"), progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "dump_dir": str(tmp_path)})
    fast(torch.randint(0, VOCAB, (1, 9)))
    text = fq_compile.explain(fast)
    assert text == fq_compile.explain(plan)
    for word in ("fq.int", "INT4 share of layers", "average flatten ratio", "weight bytes", "lm_head", "KL4/KL8"):
        assert word in text
    assert (tmp_path / "graph_0.py").read_text().count("torch.ops.fq.flatten_quantize") >= 4
    assert "fq.int" in (tmp_path / "explain.txt").read_text()


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="w8a8"), progress=False)
    monkeypatch.setenv("FQ_DUMP_DIR", str(tmp_path / "env"))
    torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(torch.randint(0, VOCAB, (1, 5)))
    assert (tmp_path / "env" / "graph_0.py").exists()


def test_graph_breaks_make_several_graphs():
    model = tiny_opt(layers=2)
    break_graph_inside(model.model.decoder.layers[0])
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1"), progress=False)
    assert plan.calibration["graphs"] >= 2
    assert len(plan.layers) == 12
    torch._dynamo.reset()
    x = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        out = torch.compile(model, backend="flattenquant", options={"plan": plan})(x).logits
        assert _rel(out, model(x).logits) < 0.5
    assert len(reports(plan)) >= 2


def test_entry_point_resolves_without_import(tmp_path):
    code = ("import torch\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "import sys\n"
            "assert 'fq_compile' not in sys.modules\n"
            "fn = lookup_backend('flattenquant')\n"
            "print(fn.__module__, fn.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fq_compile.backend flattenquant" in out.stdout


# -- bad input ---------------------------------------------------------------------------------------

def test_no_plan_says_how_to_calibrate():
    model = tiny_opt(layers=1)
    with pytest.raises(Exception, match="fq_compile.calibrate"):
        torch.compile(model, backend="flattenquant")(torch.randint(0, VOCAB, (1, 5)))


def test_unknown_option_is_refused():
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="w8a8"), progress=False)
    with pytest.raises(Exception, match="unknown flattenquant option"):
        torch.compile(model, backend="flattenquant", options={"plan": plan, "bogus": 1})(torch.randint(0, VOCAB, (1, 5)))


def test_plan_for_another_model_names_the_layer():
    plan = fq_compile.calibrate(tiny_opt(layers=1), batches(n=1), Config(level="w8a8"), progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"model\.layers\.0\.self_attn\.q_proj.*another model"):
        torch.compile(tiny_llama(layers=1), backend="flattenquant", options={"plan": plan})(torch.randint(0, VOCAB, (1, 5)))


def test_plan_for_another_shape_names_the_layer():
    plan = fq_compile.calibrate(tiny_opt(layers=1, hidden=64), batches(n=1), Config(level="w8a8"), progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"model\.decoder\.layers\.0\.self_attn\.q_proj.*shape"):
        torch.compile(tiny_opt(layers=1, hidden=96), backend="flattenquant",
                      options={"plan": plan})(torch.randint(0, VOCAB, (1, 5)))
    with pytest.raises(PlanMismatchError, match="q_proj"):
        plan.check_model(tiny_opt(layers=1, hidden=96))


def test_plan_for_other_weights_is_refused():
    plan = fq_compile.calibrate(tiny_opt(layers=1, seed=0), batches(n=1), Config(level="w8a8"), progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="weights differ"):
        torch.compile(tiny_opt(layers=1, seed=5), backend="flattenquant",
                      options={"plan": plan})(torch.randint(0, VOCAB, (1, 5)))


def test_nan_during_calibration_names_the_layer():
    model = tiny_opt(layers=1)
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN.*fc2"):
        fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)


def test_bad_calibration_input():
    model = tiny_opt(layers=1)
    with pytest.raises(CalibrationError, match="no batches"):
        fq_compile.calibrate(model, [], Config(level="O1"), progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        fq_compile.calibrate(model, ["not a tensor"], Config(level="O1"), progress=False)
    with pytest.raises(TypeError, match="Config"):
        fq_compile.calibrate(model, batches(n=1), {"level": "O1"}, progress=False)


def test_o3_gptq_runs_and_beats_o2_rounding(make_model):
    """O3 = O2's plan with GPTQ weights: same bits and scales, lower error on held-out input."""
    model = make_model(hidden=128)
    x = torch.randint(0, VOCAB, (2, 40))
    errs = {}
    with torch.no_grad():
        ref = model(x).logits
        plans = {}
        for level in ("O2", "O3"):
            out, plan = _quantized_logits(model, x, iter(batches(n=6)), Config(level=level, gamma=2.3))
            errs[level] = _rel(out, ref)
            plans[level] = {n: (lp.bits, tuple(lp.weight_scale.tolist())) for n, lp in plan.layers.items()}
    assert plans["O2"] == plans["O3"]
    assert errs["O3"] < errs["O2"], errs


def test_batches_as_dicts_and_dtype_of_outputs():
    model = tiny_llama(layers=1)
    dict_batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches(n=2)]
    plan = fq_compile.calibrate(model, dict_batches, Config(level="O1"), progress=False)
    assert plan.calibration["batches"] == 2
    m16 = tiny_llama(layers=1).to(torch.bfloat16)
    torch._dynamo.reset()
    plan16 = fq_compile.calibrate(m16, batches(n=2), Config(level="O1"), progress=False)
    out = torch.compile(m16, backend="flattenquant", options={"plan": plan16})(torch.randint(0, VOCAB, (1, 6))).logits
    assert out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_end_to_end_uses_gpu_kernels(make_model, dtype):
    """A whole model on CUDA: Inductor's code calls our GPU kernels, never the reference ops, and
    agrees with the reference path run eagerly on the same plan."""
    from torch._inductor.utils import run_and_get_code

    model = make_model(hidden=128).to("cuda", dtype)
    data = [b.cuda() for b in batches(n=3)]
    plan = fq_compile.calibrate(model, data, Config(level="O2", gamma=2.3), progress=False)
    assert 4 in {lp.bits for lp in plan.layers.values()}
    x = torch.randint(0, VOCAB, (4, 64), device="cuda")
    with torch.no_grad():
        ref = model(x).logits           # before compiling: on CUDA the backend releases the fp weights it replaced
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
        out, code = run_and_get_code(lambda: fast(x).logits)
        torch._dynamo.reset()
        eager = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
    src = "\n".join(code)
    assert "_reference" not in src
    # Inductor fuses the float ops around ours (norms, attention) in fp16/bf16, which moves some values
    # across an INT4 rounding boundary, so compiled and eager agree only to quantization noise: both
    # must be as close to the floating-point model as each other
    assert _rel(out, ref) < 1.5 * _rel(eager, ref) + 1e-2
    assert _rel(out, ref) < 0.5
