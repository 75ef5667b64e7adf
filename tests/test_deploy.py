"""Quantized artefacts (fq_compile/deploy.py): save, load in a fresh process without the floating-point
weights, bit-identical outputs; load memory bounded by the artefact; damaged artefacts refused."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fq_compile
from fq_compile import ArtefactFormatError, Config, PlanMismatchError
from fq_compile.deploy import MANIFEST, PLAN_FILE, WEIGHTS_FILE, _file_record, _manifest_checksum
from fq_compile.runtime.resident import is_released, released_origin
from tests.conftest import VOCAB, batches, run_guarded, tiny_gpt2, tiny_llama, tiny_opt

# arch -> (builder, compile the float ops with Inductor); the other two run the fq:: ops without it
ROUND_TRIP = {"opt": (tiny_opt, True), "llama": (tiny_llama, False), "gpt2": (tiny_gpt2, False)}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Each tiny model: calibrated (O2: INT4 layers among them), saved, compiled and run here; then one
    fresh process loads every artefact, compiles it and runs the same inputs."""
    root = tmp_path_factory.mktemp("deploy")
    g = torch.Generator().manual_seed(7)
    inputs = {"prefill": torch.randint(0, VOCAB, (2, 40), generator=g),     # > 64 rows: quantize + GEMM ops
              "decode": torch.randint(0, VOCAB, (1, 5), generator=g),       # <= 64 rows: fq.flat_linear
              "prompt": torch.randint(0, VOCAB, (1, 6), generator=g)}
    save_file(inputs, str(root / "inputs.safetensors"))
    expected, specs = {}, []
    for arch, (build, inductor) in ROUND_TRIP.items():
        torch._dynamo.reset()
        model = build(layers=2)
        plan = fq_compile.calibrate(model, batches(n=2), Config(level="O2", gamma=100.0), progress=False)
        assert 4 in {lp.bits for lp in plan.layers.values()}      # the packed-INT4 path is covered
        fq_compile.save_quantized(model, plan, root / arch)
        fast = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": inductor})
        with torch.no_grad():
            for key in ("prefill", "decode"):
                expected[f"{arch}.{key}"] = fast(inputs[key]).logits
            expected[f"{arch}.generate"] = fast.generate(inputs["prompt"], max_new_tokens=6, min_new_tokens=6,
                                                         do_sample=False)
        specs.append(f"{arch}:inductor" if inductor else arch)
    torch._dynamo.reset()
    run_guarded(["-m", "tests.deploy_child", "roundtrip", str(root), *specs], timeout=900)
    return expected, load_file(str(root / "got.safetensors"))


@pytest.mark.parametrize("arch", list(ROUND_TRIP))
def test_loaded_in_a_fresh_process_is_bit_identical(round_trip, arch):
    """Prefill and decode-sized logits and generate()'s tokens, bit for bit (the child also checks that
    the quantized weights hold no bytes and that the un-compiled loaded model refuses to run)."""
    expected, got = round_trip
    for key in ("prefill", "decode", "generate"):
        assert torch.equal(got[f"{arch}.{key}"], expected[f"{arch}.{key}"]), (arch, key)


# -- memory ---------------------------------------------------------------------------------------

LOAD_FACTOR = 1.15
# Fixed cost of a load beyond the artefact's bytes, independent of the model's size (measured 14-16 MiB
# for artefacts of 75 and 290 MB): the first safetensors open, the plan's JSON metadata and Python
# objects, the meta model's modules, QuantPlan.validate's temporaries (one weight-sized bool at a time).
LOAD_ALLOWANCE = 20 * 2**20


def test_load_peak_memory_stays_within_the_artefact_where_fp16_would_not(tmp_path):
    """An fp16 OPT (hidden 1024, 8 blocks: 135 MB of fp16 weights) saved at O1; a fresh process loads
    it and its peak RSS (reset after the imports) stays within 1.15x the artefact + LOAD_ALLOWANCE,
    a limit its fp16 weights alone exceed, so a load that materialised them would fail here."""
    from fq_compile.tools.synthetic import synthetic_plan

    model = tiny_opt(hidden=1024, layers=8, outliers=False).half()
    plan = synthetic_plan(model, "O1", flatten_ratio=0.1, progress=False)
    fq_compile.save_quantized(model, plan, tmp_path / "art")
    fp16 = sum(p.numel() * p.element_size() for p in model.parameters())
    del model, plan
    out = json.loads(run_guarded(["-m", "tests.deploy_child", "peak", str(tmp_path / "art")], timeout=300)
                     .strip().splitlines()[-1])
    if "error" in out:
        pytest.skip(out["error"])
    limit = LOAD_FACTOR * out["artefact"] + LOAD_ALLOWANCE
    assert fp16 > limit, "the model is too small for the test to tell a quantized load from an fp16 one"
    assert out["delta"] <= limit, (f"loading took {out['delta'] / 2**20:.1f} MiB for a "
                                   f"{out['artefact'] / 2**20:.1f} MiB artefact (limit {limit / 2**20:.1f} MiB)")
    assert out["params"] < 0.05 * out["artefact"]     # the loaded parameters: embeddings, norms, biases


# -- refusals ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch._dynamo.reset()
    model = tiny_opt(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    path = tmp_path_factory.mktemp("saved") / "art"
    fq_compile.save_quantized(model, plan, path)
    return model, plan, path


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved[2], tmp_path / "art")
    return tmp_path / "art"


def _rewrite_manifest(path, edit) -> None:
    """Edit the manifest and make it consistent again (sizes, sha256, checksum): a hand-made artefact."""
    m = json.loads((path / MANIFEST).read_text())
    edit(m)
    m["files"] = {rel: _file_record(path / rel) for rel in m["files"]}
    m["checksum"] = _manifest_checksum(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_truncated_file_is_refused(copy):
    data = (copy / PLAN_FILE).read_bytes()
    (copy / PLAN_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtefactFormatError, match=r"plan\.fqplan has \d+ bytes, the manifest says \d+ \(truncated"):
        fq_compile.load_quantized(copy)


def test_changed_byte_is_refused(copy):
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x40
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtefactFormatError, match=r"weights\.safetensors does not match its sha256"):
        fq_compile.load_quantized(copy)


def test_missing_file_and_missing_manifest_are_refused(copy):
    (copy / "config.json").unlink()
    with pytest.raises(ArtefactFormatError, match=r"config\.json is missing"):
        fq_compile.load_quantized(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtefactFormatError, match="no manifest.json: not an fq_compile artefact"):
        fq_compile.load_quantized(copy)


def test_edited_manifest_is_refused(copy):
    m = json.loads((copy / MANIFEST).read_text())
    m["level"] = "O3"
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtefactFormatError, match="manifest.json was changed after it was written"):
        fq_compile.load_quantized(copy)


def test_other_format_version_is_refused(copy):
    _rewrite_manifest(copy, lambda m: m.update(format_version=2, fq_compile_version="9.9"))
    with pytest.raises(ArtefactFormatError, match=r"format version 2 \(written by fq_compile 9\.9\); this fq_compile "
                                                  r"reads version 1"):
        fq_compile.load_quantized(copy)


def test_tampered_plan_is_refused_even_without_the_file_hashes(copy):
    """verify=False skips the manifest's sha256 of each file; the plan file's own checksum still holds."""
    data = bytearray((copy / PLAN_FILE).read_bytes())
    data[-5] ^= 0x01
    (copy / PLAN_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtefactFormatError, match=r"plan\.fqplan: tensor data does not match its checksum"):
        fq_compile.load_quantized(copy, verify=False)


def test_config_that_does_not_match_the_plan_is_refused(copy):
    """A consistent artefact (hashes recomputed) whose config.json describes another model size."""
    cfg = json.loads((copy / "config.json").read_text())
    cfg["ffn_dim"] = 2 * cfg["ffn_dim"]
    (copy / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(copy, lambda m: None)
    with pytest.raises(PlanMismatchError, match=r"config\.json does not describe the model the plan was made for.*"
                                                r"fc1\.bias is \[256\] by config\.json, \[128\] in the plan"):
        fq_compile.load_quantized(copy)


def test_uncompiled_model_refuses_and_only_its_own_plan_compiles_it(saved):
    model, plan, path = saved
    loaded = fq_compile.load_quantized(path)
    assert loaded.fq_plan.model_hash == plan.model_hash
    q = loaded.get_submodule(next(iter(plan.layers)))
    assert is_released(q.weight) and released_origin(q.weight) == "artefact" and q.weight.shape == (64, 64)
    x = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"q_proj was loaded from a quantized artefact .* cannot run"):
            loaded(x)
        with pytest.raises(Exception, match="whose plan is model.fq_plan"):     # no plan: the hint names it
            torch.compile(loaded, backend="flattenquant")(x)
        torch._dynamo.reset()
        other = fq_compile.calibrate(tiny_opt(seed=1, layers=1), batches(n=1), Config(level="O1"), progress=False)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"loaded from a quantized artefact whose plan was made from other weights"):
            torch.compile(loaded, backend="flattenquant", options={"plan": other, "inductor": False})(x)
        torch._dynamo.reset()
        fast = fq_compile.load_quantized(path, compile={"options": {"inductor": False}})
        ref = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})
        assert torch.equal(fast(x).logits, ref(x).logits)


def test_save_refuses_a_plan_of_other_weights_and_a_foreign_directory(saved, tmp_path):
    model, plan, _ = saved
    with pytest.raises(PlanMismatchError):
        fq_compile.save_quantized(tiny_opt(seed=1, layers=1), plan, tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        fq_compile.save_quantized(model, plan, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    fq_compile.save_quantized(model, plan, tmp_path / "twice")
    fq_compile.save_quantized(model, plan, tmp_path / "twice")         # an artefact is replaced
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == sorted(
        ["config.json", "generation_config.json", MANIFEST, PLAN_FILE, WEIGHTS_FILE])


# -- command line -------------------------------------------------------------------------------------

from tests.tools.test_cli import model_dir  # noqa: E402,F401  (a tiny Llama directory with a tokenizer, and data)


def test_cli_quantize_save_then_demo_from(model_dir, tmp_path, capsys):  # noqa: F811
    """fq-compile quantize --save DIR, then demo --from DIR: the loaded artefact's perplexity and greedy text
    are those of the saving side's model compiled with the same plan."""
    from fq_compile.tools.cli import greedy, main
    from fq_compile.tools.data import wikitext_test
    from fq_compile.tools.evaluate import compile_quantized, perplexity
    from fq_compile.tools.models import load_model

    data = str(model_dir / "data")
    common = ["--model", str(model_dir / "model"), "--data-dir", data, "--calib-batches", "2", "--calib-seqlen", "24",
              "--no-progress"]
    art = tmp_path / "art"
    assert main(["quantize", *common]) == 2                    # nowhere to write
    assert main(["quantize", *common, "--level", "O1", "--save", str(art)]) == 0
    assert (art / "tokenizer_config.json").is_file() and (art / MANIFEST).is_file()
    capsys.readouterr()
    prompt = "the cat sat on"
    assert main(["demo", "--from", str(art), "--data-dir", data, "--ppl-seqlen", "64", "--ppl-tokens", "256",
                 "--prompt", prompt, "--max-new-tokens", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    torch._dynamo.reset()
    lm = load_model(str(model_dir / "model"))
    fast = compile_quantized(lm.model, fq_compile.QuantPlan.load(art / PLAN_FILE))
    ids = lm.tokenizer(wikitext_test(data), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        ppl = perplexity(fast, ids, 64, 256, progress=False)
    assert re.search(rf"^O1 +{ppl.ppl:.3f}$", out, re.M), out
    assert greedy(fast, lm.tokenizer, prompt, 4) in out and "where the time went" in out
