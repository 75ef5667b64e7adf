"""Quantized artefacts: save a quantized model once, load it later without its floating-point weights.

    fq_compile.save_quantized(model, plan, "smollm2-o1", tokenizer=tok)    # a directory to ship
    model = fq_compile.load_quantized("smollm2-o1", device="cuda")          # no fp16 copy of any quantized layer
    fast = torch.compile(model, backend="flattenquant", options={"plan": model.fq_plan})
    # or: fast = fq_compile.load_quantized("smollm2-o1", device="cuda", compile=True)

The directory (format ARTEFACT_VERSION):

    plan.fqplan          the QuantPlan (plan.py's file: quantized weights, scales, channel maps, with its own
                         checksums)
    weights.safetensors  every parameter and buffer that stays in floating point (embeddings, norms,
                         lm_head, skipped layers, rotary tables), as the saving model held them:
                         norm folds are applied at compile time from these live values (passes/lower.py),
                         so they are saved unfolded, and the loaded model compiles to the same graphs
    config.json          the model's transformers config (+ generation_config.json), and the tokenizer's
                         files when one is given
    manifest.json        format name and version, the fq_compile / torch / transformers versions that wrote
                         it, the level and target GPU class, the model class and attention implementation,
                         the quantized weights (name, shape, dtype, the fingerprint of the floating-point
                         values the plan was made from), tied names, buffers, parameters that need no
                         gradient, and the size and sha256 of every file;
                         plus a sha256 over the manifest itself

Loading builds the model from config.json on the meta device, checks it against the plan (names and
shapes of every parameter: a config that does not describe the plan's model is refused), and then
materialises only what the artefact holds: the floating-point tensors from weights.safetensors
(memory-mapped on the CPU, copied tensor by tensor to another device) and, for each quantized
layer's weight and bias (the plan holds their quantized / float32 copies), a placeholder
(runtime/resident.py): the parameter's metadata with no bytes behind it, vouched for by the plan's
fingerprint.  The backend accepts a placeholder only with a plan made
from weights of that fingerprint; the un-compiled module refuses to run (each quantized layer's
forward pre-hook says why).  Nothing of a damaged artefact runs: a file missing, truncated or
changed (size, sha256), a manifest edited, or a format version this fq_compile does not read raises
ArtefactFormatError naming the file and what is wrong; a config that does not match the plan raises
PlanMismatchError naming the parameter.

Memory while loading: every file is first read once through a small buffer to check its sha256 (the
page cache, not the process, holds it); the plan and the floating-point tensors are memory-mapped
(safetensors), so on the CPU the process holds each byte of the artefact once.  On CUDA each tensor
goes to the device as it is read, and the plan's host copies are dropped once on the device.
benchmarks/deploy.py measures the peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from fq_compile.plan import ArtefactFormatError, PlanFormatError, PlanMismatchError, QuantPlan, parameter_shapes
from fq_compile.runtime.guards import fingerprint, guard_eager_runs
from fq_compile.runtime.resident import is_released, placeholder

ARTEFACT_FORMAT = "fq_compile.artefact"
ARTEFACT_VERSION = 1
MANIFEST = "manifest.json"
PLAN_FILE = "plan.fqplan"
WEIGHTS_FILE = "weights.safetensors"
_READ_CHUNK = 1 << 20


# -- saving ---------------------------------------------------------------------------------------

def save_quantized(model: torch.nn.Module, plan: QuantPlan, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` quantized by `plan` to the directory `path` (see the module docstring); returns it.

    `model` is the model the plan was made for (or a torch.compile'd one; its floating-point weights
    of quantized layers may already be released).  The plan must match it (QuantPlan.check_model, and
    the norm weights its folds were planned on).  The directory is written next to `path` and moved
    into place when complete; an existing artefact there is replaced, any other non-empty directory
    is refused."""
    import transformers

    import fq_compile

    model = getattr(model, "_orig_mod", model)
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"save_quantized: plan must be a QuantPlan, got {type(plan).__name__}")
    if not plan.config.quantize:
        raise ValueError(f"save_quantized: a level {plan.config.level!r} plan quantizes nothing; save the model itself")
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"save_quantized: {type(model).__name__} has no transformers config to rebuild it from")
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise ValueError("save_quantized: tensor-parallel (DTensor) models are not supported; save the whole "
                         "model with its whole plan")
    plan.validate()
    plan.check_model(model)
    _check_folds(model, plan)
    inventory = _inventory(model, plan)

    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).is_file())):
        raise FileExistsError(f"save_quantized: {path} exists and is not an fq_compile artefact; choose another path")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_weights(tmp / WEIGHTS_FILE, inventory["tensors"])
        plan.save(tmp / PLAN_FILE)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {rel: _file_record(tmp / rel) for rel in _listing(tmp)}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        manifest = {
            "format": ARTEFACT_FORMAT, "format_version": ARTEFACT_VERSION,
            "fq_compile_version": fq_compile.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "level": plan.config.level, "target": plan.config.target,
            "architecture": type(model).__name__, "model_type": getattr(model.config, "model_type", None),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "saved_on": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "quantized": inventory["quantized"], "aliases": inventory["aliases"], "buffers": inventory["buffers"],
            "frozen": inventory["frozen"],
            "bytes": sum(f["bytes"] for f in files.values()), "files": files,
        }
        manifest["checksum"] = _manifest_checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _weight_param(params: dict, layer: str) -> str | None:
    """The parameter name of a plan layer's weight (as QuantPlan.check_model finds it)."""
    return layer + ".weight" if layer + ".weight" in params else layer if layer in params else None


def _check_folds(model, plan: QuantPlan) -> None:
    """The norm weights that the plan's folds divide by s must be the ones it was planned on: they are
    saved as they are, and the loaded model folds them at compile time."""
    params = dict(model.named_parameters())
    for g in plan.groups.values():
        for fqn, expected in g.fold_fingerprints.items():
            t = params.get(fqn)
            if t is None:
                raise PlanMismatchError(f"group {g.name}: its fold names {fqn!r}, which this model does not have")
            if is_released(t):
                raise ValueError(f"save_quantized: the norm weight {fqn} holds no data (released)")
            got = fingerprint(t)
            if got != expected:
                raise PlanMismatchError(f"{fqn}: the norm weight differs from the one the plan folds its smoothing "
                                        f"into (fingerprint {got}, the plan's {expected}); recalibrate")


def _inventory(model, plan: QuantPlan) -> dict:
    """What the artefact holds: floating-point tensors by name, the quantized weights (metadata only),
    tied names, which names are buffers."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # the weight and bias of each quantized layer: the plan holds their quantized / float32 copies
    layer_of = {_weight_param(params, layer): (layer, "fingerprint") for layer in plan.layers}
    layer_of.update({layer + ".bias": (layer, "bias_fingerprint") for layer, lp in plan.layers.items()
                     if lp.bias is not None and layer + ".bias" in params})
    entries: dict[int, list] = {}           # id(tensor) -> [names, tensor, is_buffer]
    for name, t in params.items():
        entries.setdefault(id(t), [[], t, False])[0].append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        if t is None:
            continue
        entries.setdefault(id(t), [[], t, True])[0].append(name)
    out = {"tensors": {}, "quantized": {}, "aliases": {}, "buffers": [], "frozen": []}
    for names, t, is_buffer in entries.values():
        canonical = names[0]
        out["aliases"].update({n: canonical for n in names[1:]})
        if is_buffer:
            out["buffers"].append(canonical)
        elif not t.requires_grad:
            out["frozen"].append(canonical)
        if not is_buffer and all(n in layer_of for n in names):
            layer, key = layer_of[canonical]
            fp = getattr(plan.layers[layer], key)
            shape, dtype = list(t.shape), str(t.dtype).removeprefix("torch.")
            if fp.partition(":")[0] != f"{dtype}[{','.join(map(str, shape))}]":
                raise PlanMismatchError(f"{canonical}: the plan was made from a {fp.partition(':')[0]} tensor, "
                                        f"the model holds {dtype}{shape}")
            out["quantized"][canonical] = {"layer": layer, "shape": shape, "stride": list(t.stride()),
                                           "dtype": dtype, "fingerprint": fp}
            continue
        if is_released(t):
            raise ValueError(f"save_quantized: {canonical} holds no data (its storage was released) but is not a "
                             "quantized layer's weight; it cannot be saved")
        out["tensors"][canonical] = t
    return out


def _write_weights(file: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    seen, host = set(), {}
    for name, t in tensors.items():
        c = t.detach().to("cpu").contiguous()
        key = (c.untyped_storage().data_ptr(), c.untyped_storage().nbytes())
        if c.numel() and key in seen:     # safetensors refuses tensors that share memory
            c = c.clone()
        seen.add(key)
        host[name] = c
    save_file(host, str(file), metadata={"format": ARTEFACT_FORMAT + ".weights"})


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _file_record(file: Path) -> dict:
    h = hashlib.sha256()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
            size += n
    return {"bytes": size, "sha256": h.hexdigest()}


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- loading --------------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict:
    """The artefact's manifest, after checking its format, version and checksum and (verify) the size
    and sha256 of every file it lists.  Raises ArtefactFormatError naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no artefact directory at {root}")
    file = root / MANIFEST
    if not file.is_file():
        raise ArtefactFormatError(f"{root}: no {MANIFEST}: not an fq_compile artefact (write one with "
                                  "fq_compile.save_quantized or fq-compile quantize --save)")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtefactFormatError(f"{file} is not readable JSON (truncated or corrupt?): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTEFACT_FORMAT:
        raise ArtefactFormatError(f"{file} is not an fq_compile artefact manifest "
                                  f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != ARTEFACT_VERSION:
        raise ArtefactFormatError(
            f"{root} is an artefact of format version {version!r} (written by fq_compile "
            f"{manifest.get('fq_compile_version')}); this fq_compile reads version {ARTEFACT_VERSION}: load it with "
            "the fq_compile that wrote it, or quantize the model again and save_quantized it with this one")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise ArtefactFormatError(f"{file} was changed after it was written (its checksum does not match)")
    files = manifest.get("files")
    for required in (PLAN_FILE, WEIGHTS_FILE, "config.json"):
        if not isinstance(files, dict) or required not in files:
            raise ArtefactFormatError(f"{file} lists no {required}")
    if verify:
        for rel, rec in files.items():
            f = root / rel
            if not f.is_file():
                raise ArtefactFormatError(f"{root}: {rel} is missing (the manifest lists it)")
            size = f.stat().st_size
            if size != rec["bytes"]:
                raise ArtefactFormatError(f"{root}: {rel} has {size} bytes, the manifest says {rec['bytes']} "
                                          f"({'truncated' if size < rec['bytes'] else 'grown'}: an incomplete copy?)")
            if _file_record(f)["sha256"] != rec["sha256"]:
                raise ArtefactFormatError(f"{root}: {rel} does not match its sha256 in the manifest (the file "
                                          "was changed or corrupted)")
    return manifest


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", compile: bool | dict = False,
                   verify: bool = True):
    """Load the artefact at `path` onto `device` without materialising the floating-point weights of
    its quantized layers (see the module docstring).

    Returns the model (its plan as `model.fq_plan`, the manifest as `model.fq_artefact`), which runs
    only compiled: torch.compile(model, backend="flattenquant", options={"plan": model.fq_plan}).
    compile=True returns that compiled module instead; a dict is passed on to torch.compile (its
    "options" merged over the plan).  verify=False skips the sha256 of every file (the plan file's
    own checksums are still checked)."""
    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    device = torch.device(device)
    try:
        plan = QuantPlan.load(root / PLAN_FILE)
    except PlanFormatError as e:
        raise ArtefactFormatError(f"{root}: {e}") from None
    model = _meta_model(root, manifest)
    _check_against_plan(model, plan, manifest, root)
    _materialise(model, root, manifest, device)
    _plan_to(plan, device)
    modules = dict(model.named_modules())
    guard_eager_runs({e["layer"]: modules[e["layer"]] for e in manifest["quantized"].values() if e["layer"] in modules})
    if (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)
    model.fq_plan = plan
    model.fq_artefact = manifest
    if not compile:
        return model
    kwargs = dict(compile) if isinstance(compile, dict) else {}
    kwargs["options"] = {"plan": plan, **kwargs.get("options", {})}
    return torch.compile(model, backend="flattenquant", **kwargs)


def _meta_model(root: Path, manifest: dict) -> torch.nn.Module:
    """The model class named by the manifest, built from config.json on the meta device."""
    import transformers

    name = manifest.get("architecture")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ArtefactFormatError(f"{root}: the manifest's model class {name!r} is not a class of this transformers "
                                  f"({transformers.__version__}; the artefact was written with "
                                  f"{manifest.get('transformers_version')})")
    config = transformers.AutoConfig.from_pretrained(root)
    if manifest.get("attn_implementation"):
        config._attn_implementation = manifest["attn_implementation"]
    with torch.device("meta"):
        model = cls(config)
    return model.eval()


def _check_against_plan(model, plan: QuantPlan, manifest: dict, root: Path) -> None:
    """config.json must describe the plan's model: every parameter's name and shape."""
    shapes = parameter_shapes(model)
    if shapes != plan.parameters:
        missing = sorted(set(plan.parameters) - set(shapes))
        extra = sorted(set(shapes) - set(plan.parameters))
        other = sorted(n for n in set(shapes) & set(plan.parameters) if shapes[n] != plan.parameters[n])
        what = (f"{other[0]} is {shapes[other[0]]} by config.json, {plan.parameters[other[0]]} in the plan" if other
                else f"the plan's {missing[0]} is not in the model config.json describes" if missing
                else f"config.json's model has {extra[0]}, which the plan does not")
        raise PlanMismatchError(f"{root}: config.json does not describe the model the plan was made for "
                                f"({plan.model_type}): {what}")
    for name, entry in manifest["quantized"].items():
        lp = plan.layers.get(entry["layer"])
        if lp is None or entry["fingerprint"] not in (lp.fingerprint, lp.bias_fingerprint):
            raise PlanMismatchError(f"{root}: the manifest's quantized {name} is not of the plan's layer "
                                    f"{entry['layer']} (another plan?)")


def _materialise(model, root: Path, manifest: dict, device: torch.device) -> None:
    """Replace every meta parameter and buffer with what the artefact holds (see the module docstring)."""
    from safetensors import safe_open

    aliases, quantized = manifest["aliases"], manifest["quantized"]
    buffers, frozen = set(manifest["buffers"]), set(manifest["frozen"])
    slots = [(n, t, False) for n, t in model.named_parameters(remove_duplicate=False)]
    slots += [(n, t, True) for n, t in model.named_buffers(remove_duplicate=False) if t is not None]
    made: dict[str, torch.Tensor] = {}
    # placeholders first: on CUDA each one's short-lived block is reused by the next, before anything is loaded
    for name, meta, is_buffer in slots:
        canonical = aliases.get(name, name)
        entry = quantized.get(canonical)
        if entry is None or canonical in made:
            continue
        dtype = getattr(torch, entry["dtype"], None)
        if is_buffer or list(meta.shape) != entry["shape"] or not isinstance(dtype, torch.dtype):
            has = "a buffer" if is_buffer else list(meta.shape)
            raise PlanMismatchError(f"{root}: the quantized weight {canonical} is {entry['dtype']}{entry['shape']}, "
                                    f"the model config.json describes has {has}")
        made[canonical] = placeholder(entry["shape"], entry["stride"], dtype, device, canonical, entry["fingerprint"])
        made[canonical].requires_grad_(canonical not in frozen)
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
        stored = set(f.keys())
        for name, meta, is_buffer in slots:
            canonical = aliases.get(name, name)
            if canonical not in made:
                if canonical not in stored:
                    raise ArtefactFormatError(f"{root}: {WEIGHTS_FILE} holds no {canonical} (a "
                                              f"{'buffer' if is_buffer else 'parameter'} of the model config.json "
                                              "describes) and it is no quantized layer's weight")
                if is_buffer != (canonical in buffers):
                    raise PlanMismatchError(f"{root}: {canonical} is a {'buffer' if is_buffer else 'parameter'} of "
                                            "the model config.json describes, not of the saved one")
                t = f.get_tensor(canonical)
                if list(t.shape) != list(meta.shape):
                    raise PlanMismatchError(f"{root}: {canonical} is {list(t.shape)} in {WEIGHTS_FILE}, "
                                            f"{list(meta.shape)} in the model config.json describes")
                if t.device != device:
                    t = t.to(device)
                made[canonical] = t if is_buffer else torch.nn.Parameter(
                    t, requires_grad=canonical not in frozen and t.is_floating_point())
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            (module._buffers if is_buffer else module._parameters)[attr] = made[canonical]
        unused = sorted(stored - set(made))
    if unused:
        raise ArtefactFormatError(f"{root}: {WEIGHTS_FILE} holds {len(unused)} tensor(s) the model config.json "
                                  f"describes does not have, e.g. {unused[0]}")
    for mname, module in model.named_modules():
        for attr, v in vars(module).items():
            if isinstance(v, torch.Tensor) and v.is_meta:
                raise ArtefactFormatError(f"{root}: {mname}.{attr} is a tensor the artefact does not hold (the model "
                                          "class creates it outside its parameters and buffers)")


def _plan_to(plan: QuantPlan, device: torch.device) -> None:
    """Each layer's tensors onto `device` (the compiled graphs read them there: runtime/state.py finds
    them in place); the rest of the plan stays on the host, copied out of the memory-mapped file so
    that the file's pages are let go."""
    if device.type == "cpu":
        return
    for lp in plan.layers.values():
        lp.weight_q = lp.weight_q.to(device)
        lp.weight_scale = lp.weight_scale.to(device)
        if lp.bias is not None:
            lp.bias = lp.bias.to(device)
    for g in plan.groups.values():
        for key in ("smooth", "extra", "weight_dup", "act_max"):
            setattr(g, key, getattr(g, key).clone())
        for key in ("src", "lo", "hi", "weight_factor", "active"):
            setattr(g.cmap, key, getattr(g.cmap, key).clone())
    for ap in plan.attention.values():
        for key in ap.TENSORS:
            setattr(ap, key, getattr(ap, key).clone())
