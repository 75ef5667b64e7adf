"""`calibrate(model, batches, config)`: observe the model's activations through its Dynamo graphs
and plan the quantization.

The model is compiled with a private backend that inserts observers (passes/observe.py) and runs
the graph eagerly, so graph breaks and recompiles are simply more graphs feeding one stats store.
The fold analysis runs on the same graphs, so the plan records where each smoothing vector lives.
With Config.attention set, the same graphs also observe each attention site's Q, K and V
(passes/attention.py) and planning/attention.py plans their scales.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from fq_compile.config import Config
from fq_compile.passes.attention import find_attention, insert_attention_observers, variant_reason
from fq_compile.passes.fold import find_fold_site
from fq_compile.passes.match import ParamNames
from fq_compile.passes.observe import (
    CalibrationError,
    StatsStore,
    find_linears,
    group_name,
    insert_observers,
)
from fq_compile.plan import QuantPlan, model_hash
from fq_compile.planning.attention import plan_attention
from fq_compile.planning.planner import build_plan
from fq_compile.runtime.guards import guard_eager_runs


def _call(model, batch, device):
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    raise TypeError("calibration batches must be input_ids tensors or dicts of model kwargs, "
                    f"got {type(batch).__name__}")


def skipped_layers(model: torch.nn.Module, patterns: tuple[str, ...]) -> dict[str, str]:
    """Layer names (as the graphs will name them) kept in floating point, with why.

    A graph names a linear after the parameter it reads, which for tied weights is the first owner
    (OPT's lm_head reads model.decoder.embed_tokens.weight), so a pattern matching any module that
    uses a weight skips every name of that weight."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if pname == "weight":
                owners.setdefault(id(p), []).append(mname)
    out = {}
    for names in owners.values():
        hit = [n for n in names if any(s in n for s in patterns)]
        if hit:
            for n in names:
                out[n] = (f"kept in floating point by Config.skip ({hit[0]})" if n in hit else
                          f"weight tied to {hit[0]}, kept in floating point by Config.skip")
    return out


def _kept_summary(kept: dict[str, str], by_config: dict[str, str], limit: int = 4) -> str:
    """What stayed in floating point and why, for an error message: other reasons before Config.skip."""
    if not kept:
        return ""
    names = sorted(kept, key=lambda n: n in by_config)
    shown = "; ".join(f"{n}: {kept[n]}" for n in names[:limit])
    more = len(names) - limit
    return f" (kept in floating point: {shown}{f'; and {more} more' if more > 0 else ''})"


def _warn_kept(model: torch.nn.Module, plan, unsupported: dict[str, str]) -> None:
    """Say so when weights that act as linear layers stay in floating point for a reason other than
    Config.skip (MoE experts, weights read by ops we do not rewrite): explain() lists them too."""
    if not unsupported:
        return
    params = dict(model.named_parameters())

    def numel(name):
        p = params.get(name + ".weight", params.get(name))
        return 0 if p is None else p.numel()

    kept = sum(numel(n) for n in unsupported)
    done = sum(lp.in_features * lp.out_features for lp in plan.layers.values())
    first = next(iter(unsupported))
    warnings.warn(f"fq_compile: {len(unsupported)} weight(s) of {type(model).__name__} that act as linear layers stay "
                  f"in floating point ({100 * kept / max(kept + done, 1):.0f}% of the linear-layer weights), e.g. "
                  f"{first}: {unsupported[first]}; fq_compile.explain(plan) lists them all", UserWarning, stacklevel=3)


def calibrate(model: torch.nn.Module, batches: Iterable, config: Config | None = None, *,
              progress: bool = True) -> QuantPlan:
    """Run `batches` through `model` with observers and return the QuantPlan for `config`.

    The model must be in eval mode (dropout would inflate the statistics).  The modules of the
    planned layers get fq_compile's eager-run guard (runtime/guards.py): a compiled copy that
    Dynamo runs eagerly later raises instead of computing in floating point."""
    config = config or Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be an fq_compile.Config, got {type(config).__name__}")
    training = sorted(n or type(model).__name__ for n, m in model.named_modules() if m.training)
    if training:
        raise CalibrationError(
            f"{type(model).__name__} is in training mode ({len(training)} module(s), e.g. {training[0]!r}): "
            "dropout would inflate the activation statistics. Call model.eval() before fq_compile.calibrate")
    if not config.quantize and config.attention_formats is None:
        return QuantPlan(config=config, model_type=type(model).__name__, model_hash=model_hash(model))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters to quantize") from None

    skip = skipped_layers(model, config.skip)
    if config.gptq:
        batches = list(batches)      # O3 runs them again, once per block
    store = StatsStore(sample_size=config.calib_samples, seed=config.seed, hold_out=config.format == "auto")
    folds: dict[str, tuple[str, str]] = {}
    planned_names: set[str] = set()

    by_id = {id(p): n for n, p in model.named_parameters()}

    def observer_backend(gm, example_inputs):
        name_of = ParamNames(gm, example_inputs, by_id=by_id)
        groups, unsupported = find_linears(gm, name_of)
        for lins in groups.values():
            planned_names.update(l.layer for l in lins if l.layer not in skip)
        for x, lins in groups.items():
            lins = [l for l in lins if l.layer not in skip]
            if lins:
                site = find_fold_site(x, {l.node for l in lins}, planned_names, name_of)
                folds[group_name([l.layer for l in lins])] = (site.encode(), site.note)
        gm = insert_observers(gm, store, groups if config.quantize else {}, unsupported if config.quantize else {},
                              skip)
        if config.attention_formats is not None:
            _observe_attention(gm, store, name_of, model)
        return gm.forward

    compiled = torch.compile(model, backend=observer_backend)
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    with torch.no_grad():
        for batch in tqdm(batches, total=n_batches, desc="fq_compile: calibrating", disable=not progress):
            rows = sum(st.rows for st in store.inputs.values())
            _call(compiled, batch, device)
            if store.inputs and sum(st.rows for st in store.inputs.values()) == rows:
                raise CalibrationError(
                    f"calibration batch {seen} ran without reaching any observer: Dynamo ran the model without "
                    "compiling it (its recompile limit was reached, e.g. by earlier compiles of this model class "
                    "in this process; TORCH_LOGS=recompiles). Start from fresh Dynamo caches "
                    "(torch._dynamo.reset()) or raise torch._dynamo.config.recompile_limit")
            seen += 1
    if seen == 0:
        raise CalibrationError("calibrate() got no batches: pass an iterable of input_ids tensors")
    skipped = dict(skip)
    skipped.update(store.unsupported)
    if config.quantize:
        if not store.inputs:
            raise CalibrationError(f"nothing to quantize in {type(model).__name__}: no linear layer fq_compile can "
                                   "rewrite was found in its graphs" + _kept_summary(skipped, skip))
        plan = build_plan(model, store.inputs, folds, skipped, config, progress=progress)
        if not plan.layers:
            raise CalibrationError(f"nothing to quantize in {type(model).__name__}: no linear layer ran during "
                                   "calibration" + _kept_summary(plan.skipped, skip))
        _warn_kept(model, plan, store.unsupported)
    else:
        plan = QuantPlan(config=config, model_type=type(model).__name__, model_hash=model_hash(model))
    plan.calibration.update(batches=seen, rows=max((st.rows for st in store.inputs.values()), default=0),
                            graphs=len(store.graphs))
    if config.attention_formats is not None:
        if not store.attention and not store.attention_unsupported:
            raise CalibrationError(f"Config.attention={config.attention!r}, but no attention was found in the graphs "
                                   f"of {type(model).__name__}")
        plan_attention(plan, store.attention, store.attention_unsupported, config)
    if config.gptq:
        from fq_compile.planning.gptq_driver import apply_gptq

        apply_gptq(model, plan, batches, _call, device, progress)
    modules = dict(model.named_modules())
    guard_eager_runs({name: modules[name] for name in plan.layers if name in modules})
    return plan


def _observe_attention(gm, store: StatsStore, name_of, model) -> None:
    """Observers of each attention site's Q, K, V; the module tells its cache index and the variants
    the graph does not show (sliding window, ALiBi, soft-capping)."""
    def describe(name: str):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        idx = getattr(module, "layer_idx", None)
        return idx, variant_reason(module, getattr(model, "config", None), idx)

    insert_attention_observers(gm, store, find_attention(gm, name_of), describe)
