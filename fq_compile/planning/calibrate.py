"""`calibrate(model, batches, config)`: observe the model's activations through its Dynamo graphs
and plan the quantization.

The model is compiled with a private backend that inserts observers (passes/observe.py) and runs
the graph eagerly, so graph breaks and recompiles are simply more graphs feeding one stats store.
The fold analysis runs on the same graphs, so the plan records where each smoothing vector lives.
With Config.attention set, the same graphs also observe each attention site's Q, K and V
(passes/attention.py) and planning/attention.py plans their scales.

`calibrate_many(model, batches, configs)` runs the batches once for several configs (the demo's
levels) and plans each from the same statistics: the observation (`_observe`) depends on a config
only through what it observes (linears, attention, level auto's held-out maxima: the union serves
every config) and through skip, calib_samples and seed (these must agree); the planning (`_plan`)
reads the observation without changing it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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


def _warn_kept(model: torch.nn.Module, plan, unsupported: dict[str, str], stacklevel: int = 3) -> None:
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
                  f"{first}: {unsupported[first]}; fq_compile.explain(plan) lists them all", UserWarning,
                  stacklevel=stacklevel)


def _checked_config(config, where: str = "config") -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"{where} must be an fq_compile.Config, got {type(config).__name__}")
    return config


def _require_eval(model: torch.nn.Module) -> None:
    training = sorted(n or type(model).__name__ for n, m in model.named_modules() if m.training)
    if training:
        raise CalibrationError(
            f"{type(model).__name__} is in training mode ({len(training)} module(s), e.g. {training[0]!r}): "
            "dropout would inflate the activation statistics. Call model.eval() before fq_compile.calibrate")


def _observes(config: Config) -> bool:
    """Whether `config` needs the model run at all (fp16 without attention quantization does not)."""
    return config.quantize or config.attention_formats is not None


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters to quantize") from None


def _empty_plan(model: torch.nn.Module, config: Config) -> QuantPlan:
    return QuantPlan(config=config, model_type=type(model).__name__, model_hash=model_hash(model))


@dataclass
class Observation:
    """What one calibration run saw: the statistics, the fold analysis, the layers kept in floating
    point by Config.skip, and how many batches ran.  Every plan built from it (`_plan`) reads it and
    never changes it."""

    store: StatsStore
    folds: dict[str, tuple[str, str]]
    skip: dict[str, str]
    batches: int


def _observe(model: torch.nn.Module, batches: Iterable, *, skip: tuple[str, ...], calib_samples: int, seed: int,
             linears: bool, attention: bool, hold_out: bool, device, progress: bool = True,
             caller: str = "calibrate") -> Observation:
    """Compile `model` with the observer backend and run `batches` through it once.

    linears: observe every linear input (Config.quantize); attention: observe each attention site's
    Q, K, V (Config.attention); hold_out: keep fit_absmax (level auto).  skip, calib_samples and seed
    are Config's: they decide which groups are observed, their names and their row samples."""
    skip_map = skipped_layers(model, skip)
    store = StatsStore(sample_size=calib_samples, seed=seed, hold_out=hold_out)
    folds: dict[str, tuple[str, str]] = {}
    planned_names: set[str] = set()

    by_id = {id(p): n for n, p in model.named_parameters()}

    def observer_backend(gm, example_inputs):
        name_of = ParamNames(gm, example_inputs, by_id=by_id)
        groups, unsupported = find_linears(gm, name_of)
        for lins in groups.values():
            planned_names.update(l.layer for l in lins if l.layer not in skip_map)
        for x, lins in groups.items():
            lins = [l for l in lins if l.layer not in skip_map]
            if lins:
                site = find_fold_site(x, {l.node for l in lins}, planned_names, name_of)
                folds[group_name([l.layer for l in lins])] = (site.encode(), site.note)
        gm = insert_observers(gm, store, groups if linears else {}, unsupported if linears else {}, skip_map)
        if attention:
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
        raise CalibrationError(f"{caller}() got no batches: pass an iterable of input_ids tensors")
    return Observation(store, folds, skip_map, seen)


def _plan(model: torch.nn.Module, obs: Observation, config: Config, batches, device, progress: bool) -> QuantPlan:
    """`config`'s plan from an observation made with its skip, calib_samples and seed (and with its linears
    and attention observed, and fit_absmax kept for level auto); GPTQ (O3, auto) runs `batches` again."""
    store, skip = obs.store, obs.skip
    skipped = dict(skip)
    skipped.update(store.unsupported)
    if config.quantize:
        if not store.inputs:
            raise CalibrationError(f"nothing to quantize in {type(model).__name__}: no linear layer fq_compile can "
                                   "rewrite was found in its graphs" + _kept_summary(skipped, skip))
        plan = build_plan(model, store.inputs, obs.folds, skipped, config, progress=progress)
        if not plan.layers:
            raise CalibrationError(f"nothing to quantize in {type(model).__name__}: no linear layer ran during "
                                   "calibration" + _kept_summary(plan.skipped, skip))
        _warn_kept(model, plan, store.unsupported, stacklevel=4)
    else:
        plan = _empty_plan(model, config)
    # rows of the linear inputs observed: none for a config that quantizes no linear (as when it is
    # calibrated alone), whatever a shared run observed for the others
    rows = max((st.rows for st in store.inputs.values()), default=0) if config.quantize else 0
    plan.calibration.update(batches=obs.batches, rows=rows, graphs=len(store.graphs))
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


def calibrate(model: torch.nn.Module, batches: Iterable, config: Config | None = None, *,
              progress: bool = True) -> QuantPlan:
    """Run `batches` through `model` with observers and return the QuantPlan for `config`.

    The model must be in eval mode (dropout would inflate the statistics).  The modules of the
    planned layers get fq_compile's eager-run guard (runtime/guards.py): a compiled copy that
    Dynamo runs eagerly later raises instead of computing in floating point."""
    config = _checked_config(config or Config())
    _require_eval(model)
    if not _observes(config):
        return _empty_plan(model, config)
    obs, batches, device = _observe_for(model, batches, [config], ["config"], progress, "calibrate")
    return _plan(model, obs, config, batches, device, progress)


# What decides the observation of the linear inputs (_observe()): which groups, their names, their row
# samples.  Configs that quantize share one observation only where these are equal.
SHARED_FIELDS = ("calib_samples", "seed", "skip")


def _observe_for(model, batches, cfgs: list[Config], labels: list[str], progress: bool, caller: str):
    """One observation serving every config of `cfgs` (each needs the model run: `_observes`): the union
    of what they observe, after checking that those that quantize agree on SHARED_FIELDS.  Returns the
    observation, the batches (a list when a config runs GPTQ, which runs them again) and the device."""
    device = _model_device(model)
    quantizing = [i for i, c in enumerate(cfgs) if c.quantize]
    for name in SHARED_FIELDS:
        if len({getattr(cfgs[i], name) for i in quantizing}) > 1:
            each = ", ".join(f"{getattr(cfgs[i], name)!r} for {labels[i]}" for i in quantizing)
            raise ValueError(
                f"{caller}(): the configs differ in Config.{name} ({each}), which decides what calibration "
                f"observes; configs that quantize share one run only with equal {', '.join(SHARED_FIELDS)}: "
                f"call {caller} once per value, or calibrate() for each")
    ref = cfgs[quantizing[0]] if quantizing else cfgs[0]
    if any(c.gptq for c in cfgs):
        batches = list(batches)      # O3 and auto run them again, once per block
    obs = _observe(model, batches, skip=ref.skip, calib_samples=ref.calib_samples, seed=ref.seed,
                   linears=bool(quantizing), attention=any(c.attention_formats is not None for c in cfgs),
                   hold_out=any(cfgs[i].format == "auto" for i in quantizing), device=device, progress=progress,
                   caller=caller)
    return obs, batches, device


def calibrate_many(model: torch.nn.Module, batches: Iterable,
                   configs: Mapping[str, Config] | Sequence[Config], *,
                   progress: bool = True) -> dict[str, QuantPlan] | list[QuantPlan]:
    """One calibration run, several plans: the QuantPlan of each config, each equal to what
    `calibrate(model, batches, config)` returns for it alone, for the cost of one run of `batches`
    (plus each config's planning, and GPTQ's own runs for O3 and auto).

    configs: a dict (plans come back as a dict with the same keys) or a list (a list, in order).
    The observation is the union of what the configs need: linear inputs where any config quantizes,
    attention's Q/K/V where any quantizes attention, the held-out maxima where any is level auto;
    none of these changes what the others read.  The configs that quantize must agree on
    calib_samples, seed and skip (SHARED_FIELDS), which decide the statistics themselves; else
    ValueError, naming the field.  A config that quantizes nothing (fp16 without attention) takes
    no part in the run, as in calibrate."""
    if isinstance(configs, Mapping):
        keys: list | None = list(configs)
        cfgs = [_checked_config(c, f"configs[{k!r}]") for k, c in configs.items()]
        labels = [repr(k) for k in keys]
    elif isinstance(configs, (str, bytes)) or not isinstance(configs, Iterable):
        raise TypeError(f"configs must be a dict or a list of fq_compile.Config, got {type(configs).__name__}")
    else:
        keys = None
        cfgs = [_checked_config(c, f"configs[{i}]") for i, c in enumerate(configs)]
        labels = [f"{i} ({c.level})" for i, c in enumerate(cfgs)]
    if not cfgs:
        raise ValueError("calibrate_many() needs at least one Config")
    _require_eval(model)
    observing = [i for i, c in enumerate(cfgs) if _observes(c)]
    obs = device = None
    if observing:
        obs, batches, device = _observe_for(model, batches, [cfgs[i] for i in observing],
                                            [labels[i] for i in observing], progress, "calibrate_many")
    plans = []
    for c in cfgs:       # a loop, not a comprehension: _warn_kept's stacklevel names the caller's line
        plans.append(_plan(model, obs, c, batches, device, progress) if _observes(c) else _empty_plan(model, c))
    return dict(zip(keys, plans)) if keys is not None else plans


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
