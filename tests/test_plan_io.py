"""QuantPlan.save/load: round trip, and refusal of truncated, corrupt and foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fq_compile
from fq_compile import Config, PlanFormatError, QuantPlan
from tests.conftest import VOCAB, batches, tiny_gpt2, tiny_llama, tiny_opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch._dynamo.reset()
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O2", gamma=2.5), progress=False)
    path = tmp_path_factory.mktemp("plan") / "tiny.fqplan"
    plan.save(path)
    return model, plan, path


def test_round_trip_gives_the_same_model(saved):
    model, plan, path = saved
    loaded = QuantPlan.load(path)
    assert loaded.config == plan.config and loaded.model_hash == plan.model_hash
    assert set(loaded.layers) == set(plan.layers) and loaded.skipped == plan.skipped
    for name, lp in plan.layers.items():
        lq = loaded.layers[name]
        assert torch.equal(lq.weight_q, lp.weight_q) and lq.bits == lp.bits and torch.equal(lq.scale, lp.scale)
    assert {lp.bits for lp in loaded.layers.values()} == {4, 8}      # both kinds survive the trip
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": str(path), "inductor": False})(x).logits
    assert torch.equal(a, b)
    loaded.check_model(model)


def test_round_trip_keeps_transposed_layers_and_the_parameter_list(tmp_path):
    """GPT-2's Conv1D layers (weights stored [K, N]) survive the trip, and so does the list of the
    model's parameters that explain() counts its bytes from."""
    torch._dynamo.reset()
    model = tiny_gpt2(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    assert all(lp.transposed for lp in plan.layers.values())
    plan.save(tmp_path / "gpt2.fqplan")
    loaded = QuantPlan.load(tmp_path / "gpt2.fqplan")
    assert {n: lp.transposed for n, lp in loaded.layers.items()} == {n: True for n in plan.layers}
    assert loaded.parameters == plan.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
    assert fq_compile.explain(loaded) == fq_compile.explain(plan)
    loaded.check_model(model)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch._dynamo.reset()
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": loaded, "inductor": False})(x).logits
    assert torch.equal(a, b)


def test_truncated_file_is_refused(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "cut.fqplan"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanFormatError, match="truncated or corrupt"):
        QuantPlan.load(bad)


def test_flipped_tensor_byte_is_refused(saved, tmp_path):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "flip.fqplan"
    bad.write_bytes(bytes(data))
    with pytest.raises(PlanFormatError, match="checksum"):
        QuantPlan.load(bad)


def test_foreign_and_garbage_files_are_refused(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3, 3)}, other, metadata={"format": "pt"})
    with pytest.raises(PlanFormatError, match="not an fq_compile plan"):
        QuantPlan.load(other)
    junk = tmp_path / "junk.fqplan"
    junk.write_bytes(b"\x00\x01 definitely not a plan" * 10)
    with pytest.raises(PlanFormatError):
        QuantPlan.load(junk)
    with pytest.raises(FileNotFoundError):
        QuantPlan.load(tmp_path / "missing.fqplan")


def _read(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, header, tensors, meta=None, reseal=True):
    """Write a plan file with `meta` as its plan JSON; reseal: recompute the checksums, as a
    hand-edited or buggy writer would, so that only QuantPlan.validate can refuse the file."""
    from fq_compile.plan import _header_checksum, _tensor_digest

    header = dict(header)
    if meta is not None:
        header["plan"] = json.dumps(meta)
    if reseal:
        header["tensor_sha256"] = _tensor_digest(tensors)
        header["checksum"] = _header_checksum(header)
    save_file(tensors, path, metadata=header)
    return path


def test_other_versions_are_refused_with_what_to_do(saved, tmp_path):
    _, _, path = saved
    header, tensors = _read(path)
    for version, words in (("999", "use the fq_compile that wrote it"),
                           ("4", "transposed.*parameter shapes.*recalibrate"),
                           ("3", "per-layer formats.*transposed.*recalibrate"), ("2", "recalibrate"),
                           ("1", "recalibrate")):
        bad = _write(tmp_path / f"v{version}.fqplan", {**header, "format_version": version}, tensors)
        with pytest.raises(PlanFormatError, match=f"version {version}.*{words}"):
            QuantPlan.load(bad)


def test_metadata_change_breaks_the_checksum(saved, tmp_path):
    """The JSON header is covered: one scale changed by a digit, checksums left alone, is refused."""
    _, plan, path = saved
    header, tensors = _read(path)
    meta = json.loads(header["plan"])
    layer = next(iter(meta["layers"]))
    meta["layers"][layer]["act_scale"] *= 2.77
    bad = _write(tmp_path / "edited.fqplan", header, tensors, meta, reseal=False)
    with pytest.raises(PlanFormatError, match="metadata does not match its checksum"):
        QuantPlan.load(bad)


def test_random_bit_flips_in_the_header_are_all_refused(saved, tmp_path):
    """The issue found 38 of 150 single-bit flips in the JSON header loading (10 silently changed
    scales, thresholds or bits); every one must now be refused with PlanFormatError."""
    import random
    import struct

    _, _, path = saved
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    rng = random.Random(12)
    bad = tmp_path / "flip.fqplan"
    positions = [rng.randrange(header_end * 8) for _ in range(150)] + [rng.randrange(header_end * 8, len(data) * 8)
                                                                      for _ in range(20)]
    for bit in positions:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(PlanFormatError):
            QuantPlan.load(bad)


def test_malformed_metadata_is_refused(saved, tmp_path):
    _, _, path = saved
    header, tensors = _read(path)
    bad = _write(tmp_path / "broken.fqplan", header, tensors, {"config": {}})
    with pytest.raises(PlanFormatError, match="malformed"):
        QuantPlan.load(bad)
    meta = json.loads(header["plan"])
    meta["config"]["alpha"] = 7.0
    bad = _write(tmp_path / "config.fqplan", header, tensors, meta)
    with pytest.raises(PlanFormatError, match="config: Config.alpha=7.0"):
        QuantPlan.load(bad)


def _layer(plan, bits=None):
    return next(lp for lp in plan.layers.values() if bits is None or lp.bits == bits)


def _oblong(plan):
    return next(lp for lp in plan.layers.values() if lp.in_features != lp.out_features)


# each edit makes one field wrong in a plan whose checksums are then recomputed; the error names the field
FIELD_EDITS = {
    "bits": (lambda p: setattr(_layer(p, 8), "bits", 9), r"\.bits: 9 must be 4 or 8"),
    "bits-4-as-8": (lambda p: setattr(_layer(p, 4), "bits", 8), r"\.bits: 8 but format int4 has 4-bit weights"),
    "format-int4-as-int8": (lambda p: _layer(p, 4).__dict__.update(bits=8, format="int8"),
                            r"\.weight_q: dtype torch.uint8"),
    "format": (lambda p: setattr(_layer(p), "format", "nf4"), r"\.format: 'nf4' must be one of int8, int4, fp8"),
    "format-fp8-as-int8": (lambda p: setattr(_layer(p, 8), "format", "fp8"), r"\.weight_q: dtype torch.int8"),
    "errors": (lambda p: setattr(_layer(p), "errors", {"int8": -1.0}), r"\.errors\['int8'\]: -1.0 must be None"),
    "act_scale": (lambda p: setattr(_layer(p), "act_scale", _layer(p).act_scale * 2.77),
                  r"\.act_scale: .* != (the group's threshold|1 / \d+ \(per-token group\))"),
    "act_scale-negative": (lambda p: setattr(_layer(p), "act_scale", -1.0), r"\.act_scale: -1.0 must be a finite"),
    "weight_scale-nan": (lambda p: _layer(p).weight_scale.__setitem__(0, float("nan")),
                         r"\.weight_scale: every entry must be finite and > 0"),
    "weight_scale-zero": (lambda p: _layer(p).weight_scale.__setitem__(-1, 0.0),
                          r"\.weight_scale: every entry must be finite and > 0"),
    "weight_scale-number": (lambda p: setattr(_layer(p), "weight_scale", 0.01), r"\.weight_scale: must be a tensor"),
    "weight_scale-per-channel-negative": (
        lambda p: setattr(_layer(p), "weight_scale", -torch.ones(_layer(p).out_features)),
        r"\.weight_scale: every entry must be finite and > 0"),
    "weight_scale-per-channel-shape": (lambda p: setattr(_layer(p), "weight_scale", torch.ones(3)),
                                       r"\.weight_scale: shape \(3,\)"),
    "threshold": (lambda p: setattr(next(iter(p.groups.values())), "threshold", float("inf")), r"\.threshold: inf"),
    "smooth": (lambda p: next(iter(p.groups.values())).smooth.__setitem__(0, -1.0), r"\.smooth: every entry"),
    "cmap-src": (lambda p: next(iter(p.groups.values())).cmap.src.__setitem__(-1, 10**6), r"\.cmap\.src: every index"),
    "cmap-active": (lambda p: next(iter(p.groups.values())).cmap.active.fill_(True), r"\.cmap\.active"),
    "fold-kind": (lambda p: setattr(next(iter(p.groups.values())), "fold", "blend:x"), r"\.fold: 'blend:x' is not"),
    "fold-rows-producer": (lambda p: setattr(next(g for g in p.groups.values() if g.fold.startswith("rows:")),
                                             "fold", "rows:nowhere"), r"\.fold: 'rows:nowhere': the producer"),
    "weight_q-int8-range": (lambda p: _layer(p, 8).weight_q.view(-1).__setitem__(0, -128), r"\.weight_q: INT8"),
    "weight_q-shape": (lambda p: setattr(_layer(p, 8), "weight_q", _layer(p, 8).weight_q[:, :-2].contiguous()),
                       r"\.weight_q: shape"),
    "in_features": (lambda p: setattr(_layer(p), "in_features", 3), r"\.in_features: 3 != its group"),
    "group": (lambda p: setattr(_layer(p), "group", "nowhere"), r"\.layers: '.*' is not a plan layer of this group"),
    "fingerprint": (lambda p: setattr(_layer(p), "fingerprint", 12.5), r"\.fingerprint: 12.5 must be"),
    "skipped-and-quantized": (lambda p: p.skipped.__setitem__(next(iter(p.layers)), "why"),
                              r"skipped\[.*\]: the layer is both skipped and quantized"),
    "model_hash": (lambda p: setattr(p, "model_hash", "abc"), r"model_hash: 'abc' must be 64 hexadecimal"),
    "transposed-type": (lambda p: setattr(_layer(p), "transposed", 1), r"\.transposed: 1 must be true or false"),
    "transposed-layout": (lambda p: p.parameters.__setitem__(_oblong(p).name + ".weight", [_oblong(p).in_features,
                                                                                           _oblong(p).out_features]),
                          r"\.transposed: the model's weight is"),
    "parameters": (lambda p: p.parameters.__setitem__("x.weight", [2, -1]), r"parameters\['x.weight'\]: .* sizes"),
}


@pytest.mark.parametrize("edit", sorted(FIELD_EDITS))
def test_every_field_is_validated_naming_it(saved, tmp_path, edit):
    import copy

    _, plan, path = saved
    change, message = FIELD_EDITS[edit]
    bad_plan = copy.deepcopy(plan)
    change(bad_plan)
    with pytest.raises(PlanFormatError, match=message):
        bad_plan.validate()
    with pytest.raises(PlanFormatError, match=message):
        bad_plan.save(tmp_path / "never.fqplan")             # save refuses to write it
    assert not (tmp_path / "never.fqplan").exists()
    if edit == "weight_scale-number":
        return                          # a number cannot even be written as the file's tensor
    # a file holding the bad field with valid checksums (a foreign writer) is refused on load
    tensors, meta = bad_plan._tensors_and_meta()
    header, _ = _read(path)
    bad = _write(tmp_path / "bad.fqplan", header, tensors, meta)
    with pytest.raises(PlanFormatError, match=message):
        QuantPlan.load(bad)


def test_per_channel_weight_scales_round_trip(saved, tmp_path):
    """Distinct per-output-channel scales survive save/load exactly and validate."""
    import copy

    _, plan, _ = saved
    p = copy.deepcopy(plan)
    lp = _layer(p)
    lp.weight_scale = lp.weight_scale * torch.linspace(0.5, 1.5, lp.out_features)
    p.validate()
    p.save(tmp_path / "pc.fqplan")
    q = QuantPlan.load(tmp_path / "pc.fqplan")
    assert torch.equal(q.layers[lp.name].weight_scale, lp.weight_scale)


def test_loaded_plan_refuses_another_model(saved):
    _, _, path = saved
    with pytest.raises(fq_compile.PlanMismatchError, match="another model"):
        QuantPlan.load(path).check_model(tiny_opt(layers=1))


def test_formats_and_choices_survive_the_round_trip(tmp_path):
    """Per-layer formats (fp8 weights as e4m3, w4a8 packed), errors and reasons are in the file."""
    torch._dynamo.reset()
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="auto", error_budget=50.0), progress=False)
    formats = {lp.format for lp in plan.layers.values()}
    assert formats & {"fp8", "w4a8"}, formats
    path = tmp_path / "auto.fqplan"
    plan.save(path)
    loaded = QuantPlan.load(path)
    for name, lp in plan.layers.items():
        lq = loaded.layers[name]
        assert (lq.format, lq.bits, lq.error, lq.errors, lq.why) == (lp.format, lp.bits, lp.error, lp.errors, lp.why)
        assert lq.weight_q.dtype == lp.weight_q.dtype and torch.equal(lq.weight_q.view(torch.uint8),
                                                                     lp.weight_q.view(torch.uint8))
    assert loaded.calibration["auto"] == plan.calibration["auto"]
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        torch._dynamo.reset()
        b = torch.compile(model, backend="flattenquant", options={"plan": str(path), "inductor": False})(x).logits
    assert torch.equal(a, b)


def test_plans_from_before_per_layer_formats_are_refused_clearly(saved, tmp_path):
    _, _, path = saved
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for version, why in (("2", "fingerprints that cannot tell weights apart"), ("3", "no per-layer formats"),
                         ("4", "no record of which layers read their weight transposed")):
        meta["format_version"] = version
        old = tmp_path / f"old{version}.fqplan"
        save_file(tensors, old, metadata=meta)
        with pytest.raises(PlanFormatError, match=f"version {version}; this fq_compile reads version 6 "
                                                  f"\\(older plans hold [^)]*{why}.*recalibrate"):
            QuantPlan.load(old)


def test_check_model_compares_the_values(saved):
    import copy

    model, _, path = saved
    plan = QuantPlan.load(path)
    plan.check_model(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[5:9] *= -1             # same sum of |W|, other weights
    with pytest.raises(fq_compile.PlanMismatchError, match=r"up_proj\.weight: the weights differ.*other values"):
        plan.check_model(other)
    with pytest.raises(fq_compile.PlanMismatchError, match=r"dtype bfloat16 instead of float32"):
        plan.check_model(copy.deepcopy(model).to(torch.bfloat16))


def test_version_5_plans_load_as_per_tensor(saved, tmp_path):
    """A version-5 file (before per-token scales) is complete: it loads with every group per tensor,
    whatever today's default, and its config says so."""
    _, plan, path = saved
    header, tensors = _read(path)
    meta = json.loads(header["plan"])
    for g in meta["groups"].values():
        g.pop("activation_scale", None)
    meta["config"].pop("activation_scale", None)
    for name, layer in meta["layers"].items():   # a version-5 plan's act_scale is T / qmax
        g = meta["groups"][layer["group"]]
        layer["act_scale"] = g["threshold"] / (127 if layer["bits"] == 8 else 7)
    header = {**header, "format_version": "5", "plan": json.dumps(meta)}
    old = _write(tmp_path / "v5.fqplan", header, tensors, reseal=True)
    loaded = QuantPlan.load(old)
    assert {g.activation_scale for g in loaded.groups.values()} == {"tensor"}
    assert loaded.config.activation_granularity == "tensor"


def test_a_plan_and_its_loaded_copy_compile_one_after_the_other(saved):
    """Dynamo compares the backend options of two compiles of one forward on a recompile; a plan and its
    loaded copy (equal fields, tensors among them) must compare without an error: plans compare by identity."""
    model, plan, path = saved
    x = torch.randint(0, VOCAB, (1, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        a = torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": False})(x).logits
        b = torch.compile(model, backend="flattenquant", options={"plan": QuantPlan.load(path),
                                                                  "inductor": False})(x).logits
    assert torch.equal(a, b) and plan != QuantPlan.load(path) and plan == plan
