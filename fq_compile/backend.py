"""The `flattenquant` torch.compile backend.

    torch.compile(model, backend="flattenquant", options={"plan": plan})

Dynamo hands us one FX graph per region; we rewrite it with the plan (passes/lower.py) and give
the result to Inductor, which fuses the element-wise work around our ops and calls them (their GPU
kernels inline through torch.library.triton_op).  Options:

    plan       the QuantPlan from fq_compile.calibrate (or QuantPlan.load); required
    dump_dir   write each rewritten graph's code, explain(full=True) and the per-layer CSV there (env FQ_DUMP_DIR)
    inductor   False runs the rewritten graph eagerly through the reference ops (for debugging)
    gemm       "triton" | "cutlass" | "auto": the GEMM kernels while this graph compiles (over env
               FQ_GEMM; see fq_compile/kernels/dispatch.py)
    free_weights  release the floating-point weights of quantized layers once their graph is
               compiled (default: True when they live on a CUDA device, False on the CPU, so that
               CPU users can still run the un-compiled model side by side).  Only the weights that
               nothing but replaced linears reads are freed (see fq_compile/runtime/resident.py); the
               compiled model keeps working for every later call and recompile, the un-compiled
               module no longer runs (it raises, saying so).
    cudagraphs "auto" (default) | True | False: Inductor's CUDA graphs (cudagraph trees) for graphs on
               CUDA; "auto" applies them where a graph updates a static KV cache in place (decode with
               cache_implementation="static"), True everywhere, as mode="reduce-overhead" would (see
               fq_compile/generation.py for why "auto").  torch.compile refuses `mode=` together with
               `options=`, so mode="reduce-overhead" reaches us only without a plan; options={"mode":
               "reduce-overhead"} is accepted and means cudagraphs=True.
    deterministic  False (default; env FQ_DETERMINISTIC=1 turns it on) | True: Inductor's deterministic
               mode (torch._inductor.config.deterministic): no kernel choice that changes numerics is made
               by timing, so two processes compiling the same model and plan compute the same bits (by
               default Inductor times several block sizes of each reduction, such as a LayerNorm's, and
               keeps the fastest: the sums' order, and so the last bits, can differ from run to run).
               fq:: kernels give the same bits for every tiling either way.  Costs some speed in
               reductions; what deploying a saved artefact bit for bit needs (fq_compile/deploy.py).
    regions    True (default; env FQ_REGIONS=0 turns it off) | False: regional compilation
               (passes/regions.py): decoder blocks that are the same program on same-shaped tensors
               are outlined into one shared body that Inductor compiles once; the rest stay inline.
               The graph's report says how many blocks shared how many bodies.
    fuse_siblings  True (default; env FQ_FUSE_SIBLINGS=0 turns it off) | False: layers that read one input
               in the same integer format (q/k/v, gate/up) run as one GEMM over their weights concatenated
               along N, its output split to each layer (passes/siblings.py): one wide launch instead of
               several narrow ones, the same bits.  explain() marks each such layer "fused: q_proj+k_proj+...".
               Not for e4m3 layers (fp8, w4a8: float accumulation) nor tensor-parallel ones.
    defer_stop True (default) | False: generate() on CUDA reads Hugging Face's stop flag one step late
               (transformers' DeferredStopCheck), so that the host queues each decode step while the
               GPU still runs the previous one instead of waiting for it (6 ms of GPU idle in a 15.7 ms
               OPT-13B decode step on an H100); costs one dropped extra step when generation ends at EOS
               before max_new_tokens, and streams tokens one step late.  See fq_compile/generation.py.

What keeps a compiled model from silently running something else than its plan (runtime/guards.py):
  * each compiled graph is wrapped in a WeightGuard: before every call, the parameters whose values
    the rewrite consumed (quantized weights and biases, folded norm weights) must be unchanged, or
    the call raises PlanMismatchError saying to recalibrate (in-place updates, load_state_dict);
    inside fast.generate() at each graph's first call of the generate() only;
  * the module of every quantized linear gets a forward pre-hook that compiled code never runs: if
    Dynamo runs such a layer eagerly inside flattenquant-compiled code (a frame over its recompile
    limit, set_stance("eager_on_recompile")), it raises RecompileLimitError naming the remedies,
    instead of computing in floating point.  Per module, so no process-wide flag.
Use dynamic=True (torch.compile(model, backend="flattenquant", dynamic=True, options=...)) so that
changes of batch size and length need no new graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fq_compile import kernels  # noqa: F401  (registers torch.ops.fq.*)
from fq_compile.generation import cudagraph_patches, parse_cudagraphs
from fq_compile.kernels import dispatch, stopwatch
from fq_compile.passes.attention import rewrite_attention
from fq_compile.passes.lower import GraphReport, rewrite
from fq_compile.passes.match import owner_modules
from fq_compile.plan import QuantPlan
from fq_compile.runtime.guards import WeightGuard, guard_eager_runs
from fq_compile.runtime.state import reports

_KNOWN_OPTIONS = {"plan", "dump_dir", "inductor", "free_weights", "gemm", "cudagraphs", "mode", "regions",
                  "deterministic", "defer_stop", "fuse_siblings"}


class BackendOptionsError(ValueError):
    """The options passed to torch.compile(..., backend="flattenquant") are wrong."""


def flattenquant(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Dynamo backend entry point (registered as 'flattenquant' through the torch_dynamo_backends
    entry-point group, so users need no import)."""
    options = dict(options or {})
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise BackendOptionsError(f"unknown flattenquant option(s) {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    mode = options.get("mode", kwargs.get("mode"))
    if mode not in (None, "default", "reduce-overhead"):
        raise BackendOptionsError(f"backend='flattenquant' takes no mode={mode!r}; its knobs are options "
                                  f"(known: {sorted(_KNOWN_OPTIONS)})")
    try:
        cudagraphs = parse_cudagraphs(options.get("cudagraphs"), mode)
    except ValueError as e:
        raise BackendOptionsError(str(e)) from None
    deterministic, persistent = _deterministic(options), _persistent_limit()
    if not isinstance(options.get("defer_stop", True), bool):    # read by generate() (generation.py)
        raise BackendOptionsError(f"options['defer_stop'] must be True or False, got {options['defer_stop']!r}")
    plan = options.get("plan")
    if plan is None:
        from fq_compile.runtime.resident import released_origin

        if any(released_origin(t) == "artefact" for t in example_inputs):
            raise BackendOptionsError(
                "backend='flattenquant' needs a plan: this model was loaded from a quantized artefact "
                "(fq_compile.load_quantized), whose plan is model.fq_plan: torch.compile(model, "
                "backend='flattenquant', options={'plan': model.fq_plan}), or load_quantized(path, compile=True)")
        cg = " with CUDA graphs: options={'plan': plan, 'cudagraphs': True}" if mode == "reduce-overhead" else ""
        raise BackendOptionsError(
            "backend='flattenquant' needs a plan: plan = fq_compile.calibrate(model, batches, "
            "fq_compile.Config(level='O1')) (or fq_compile.QuantPlan.load(path)), then "
            "torch.compile(model, backend='flattenquant', options={'plan': plan})"
            + (f"; torch.compile refuses mode= together with options=, so ask{cg}" if cg else ""))
    if isinstance(plan, (str, os.PathLike)):
        plan = QuantPlan.load(plan)
    if not isinstance(plan, QuantPlan):
        raise BackendOptionsError(f"options['plan'] must be a QuantPlan or a path to one, got {type(plan).__name__}")

    compiled_reports = reports(plan)
    index = len(compiled_reports)
    before = set(gm.graph.nodes)
    with stopwatch.stage("rewrite"):
        attention = rewrite_attention(gm, example_inputs, plan)     # first: it names sites by their linears
        if plan.config.quantize:
            report = rewrite(gm, example_inputs, plan, index, gemm_mode=options.get("gemm"),
                             fuse_siblings=_fuse_siblings(options))
        else:
            report = GraphReport(index, code=gm.code)
    report.attention = attention
    compiled_reports.append(report)
    index_of = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    watched = [(index_of[n], fqn, fp) for n, (fqn, fp) in report.watched.items() if n in index_of]

    dump_dir = options.get("dump_dir") or os.environ.get("FQ_DUMP_DIR")
    if dump_dir:
        from fq_compile.explain import explain

        d = Path(dump_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"graph_{index}.py").write_text(report.code)
        (d / "explain.txt").write_text(explain(plan, full=True) + "\n")
        (d / "layers.csv").write_text(explain(plan, fmt="csv"))

    if options.get("inductor", True) is False:
        compiled = gm.forward
    else:
        patches = cudagraph_patches(cudagraphs, gm, example_inputs, index)
        outlined = _outline(gm, set(gm.graph.nodes) - before, report, options)
        with (dispatch.use(options.get("gemm")), _inductor_settings(deterministic), persistent_reductions(persistent),
              stopwatch.stage("Inductor compile")):
            compiled = _compile_fx(outlined, gm, example_inputs, patches, report)
    if not plan.config.quantize:
        return compiled
    _guard_layers(gm, example_inputs, report)
    free = options.get("free_weights")
    if free is None:
        free = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if free:
        report.released_bytes = _release_replaced(gm, example_inputs, report, plan)
    return WeightGuard(compiled, example_inputs, watched) if watched else compiled


flattenquant._fq_backend = True     # how runtime/guards.py recognises Dynamo callbacks that compile with us


_warned_unguarded: set[str] = set()


def _guard_layers(gm, example_inputs, report: GraphReport) -> None:
    """Hook the module of every replaced linear so that an eager run of it raises (runtime/guards.py)."""
    import warnings

    modules = owner_modules(gm, example_inputs, report.layer_weights)
    guard_eager_runs(modules)
    missing = sorted(set(report.layer_weights.values()) - set(modules))
    if missing and missing[0] not in _warned_unguarded:
        _warned_unguarded.add(missing[0])
        warnings.warn(f"fq_compile: could not find the module of {len(missing)} quantized layer(s) (e.g. {missing[0]}) "
                      "in the frame Dynamo traced; if Dynamo ever runs them eagerly (recompile limit), they would "
                      "compute in floating point without an error", RuntimeWarning, stacklevel=2)


def _fuse_siblings(options: dict) -> bool:
    """options['fuse_siblings'], else env FQ_FUSE_SIBLINGS (on unless 0 / false / off)."""
    value = options.get("fuse_siblings", os.environ.get("FQ_FUSE_SIBLINGS", "1") not in ("0", "false", "off"))
    if not isinstance(value, bool):
        raise BackendOptionsError(f"options['fuse_siblings'] must be True or False, got {value!r}")
    return value


def _outline(gm, inserted: set, report: GraphReport, options: dict):
    """gm with its repeated blocks outlined (passes/regions.py), unless options['regions'] or env
    FQ_REGIONS=0 turn it off."""
    from fq_compile.passes.regions import outline_blocks

    wanted = options.get("regions", os.environ.get("FQ_REGIONS", "1") not in ("0", "false", "off"))
    if not wanted:
        report.regions = "regional compilation: off"
        return gm
    with stopwatch.stage("rewrite"):
        outlined, regions = outline_blocks(gm, inserted)
    report.regions = regions.summary()
    return outlined


def _compile_fx(outlined, gm, example_inputs, patches, report: GraphReport):
    """Inductor on the outlined graph; on the original one where Inductor refuses the outlined graph
    (a torch without invoke_subgraph support for what a block does), with a warning."""
    from torch._inductor.compile_fx import compile_fx

    if outlined is gm:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    try:
        return compile_fx(outlined, example_inputs, config_patches=patches or None)
    except Exception as e:  # noqa: BLE001 - the same graph compiled whole is the fallback
        import warnings

        warnings.warn(f"fq_compile: regional compilation failed for graph {report.index} ({type(e).__name__}: "
                      f"{str(e)[:300]}); compiling it whole (options={{'regions': False}} skips the attempt)",
                      RuntimeWarning, stacklevel=3)
        report.regions = "regional compilation: failed, compiled whole"
        return compile_fx(gm, example_inputs, config_patches=patches or None)


def _deterministic(options: dict) -> bool:
    """options['deterministic'], else env FQ_DETERMINISTIC; a non-bool, or True on a torch whose Inductor
    has no deterministic mode, is refused."""
    value = options.get("deterministic")
    if value is None:
        value = os.environ.get("FQ_DETERMINISTIC", "0") not in ("0", "", "false", "off")
    elif not isinstance(value, bool):
        raise BackendOptionsError(f"options['deterministic'] must be True or False, got {value!r}")
    if value:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config, "deterministic"):
            raise BackendOptionsError(f"options['deterministic']=True needs torch._inductor.config.deterministic, "
                                      f"which torch {torch.__version__} lacks")
    return value


def _persistent_limit() -> int:
    """env FQ_PERSISTENT_REDUCTIONS as a number of elements (0 or unset: Inductor's own rule)."""
    raw = os.environ.get("FQ_PERSISTENT_REDUCTIONS", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        raise BackendOptionsError(f"FQ_PERSISTENT_REDUCTIONS must be an integer (elements), got {raw!r}") from None


def persistent_reductions(limit: int):
    """A context under which Inductor makes inner reductions of up to `limit` elements persistent (the
    row held in registers and read from memory once) instead of only up to its fixed 1024; 0: Inductor's
    own rule (a no-op context).  Every other decision stays with the handler in place (Inductor's, or
    one a user installed through config.inductor_choices_class).  The backend takes `limit` from env
    FQ_PERSISTENT_REDUCTIONS.  What it is for: a
    per-token activation quantize fused into a LayerNorm reduces each row twice (mean/variance, then the
    row's largest slice), which Inductor loops over twice for rows wider than 1024 (H100: +41% on the
    LayerNorm + quantize kernel, results/token-scales-2026-12-06-h100.md).  An experiment until the
    device measures it (benchmarks/token_scales.py); Inductor's choices handler is the documented hook
    for such rules (torch._inductor.choices.InductorChoices).  The limit joins torch.compiler's
    cache_key_tag while it applies: Inductor's FX graph cache does not see the choices handler, and
    would otherwise hand back kernels compiled without it (it did: the first device measurement of
    this rule timed the cached non-persistent kernel twice)."""
    import contextlib

    if limit <= 0:
        return contextlib.nullcontext()
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    current = V.choices

    class PersistentUpTo(type(current)):
        def should_use_persistent_reduction(self, features, cooperative_reduction):
            if (features.get_reduction_hint() == ReductionHint.INNER and _strict_sum_allows(features)
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)):
                return True
            return current.should_use_persistent_reduction(features, cooperative_reduction)

    def _strict_sum_allows(features) -> bool:
        """torch >= 2.14: a reduction whose sum order is pinned (`strict_sum_rblock`) goes persistent only
        if its block covers the row (Inductor's own rule, kept)."""
        rblock = getattr(features, "strict_sum_rblock", lambda: None)()
        if rblock is None or features.has_strict_sum_multirow_reduction():
            return True
        return V.graph.sizevars.statically_known_geq(rblock, features.reduction_numel)

    stack = contextlib.ExitStack()
    stack.enter_context(dispatch._cache_tag(f"fq_persistent_reductions={limit}"))
    stack.enter_context(V.set_choices_handler(PersistentUpTo()))
    return stack


def _inductor_settings(deterministic: bool = False):
    """Inductor settings for the graphs we compile.
      emulate_precision_casts: Inductor keeps a fused fp16/bf16 intermediate in float32 unless told to
        round it as eager does; with the activation quantize fused into its producer
        (fq.flatten_quantize_fused) that would quantize another value than eager mode (and calibration)
        sees.  Costs a few instructions in memory-bound kernels; GEMMs and attention are unaffected.
      realize_reads_threshold 4 -> 8: an INT4 quantize reads its input twice (the two nibbles of a byte),
        and Inductor writes out a twice-read intermediate that reads more than the threshold's inputs,
        such as a LayerNorm's output (x, mean, rstd, weight, bias): the round trip fusion removes.
        Recomputing such an intermediate per reader reads the same inputs again, from cache.
      eager_numerics.division_rounding (torch 2.11+; emulate_divison_rounding in 2.10): a float32
        division as a correctly rounded one (div_rn) in Triton code, where Triton's own `/` rounds
        approximately: the per-token quantize divides qmax by the row's maximum
        (kernels/flatten_quantize.py), and must give the bits the reference and our kernels give.
      deterministic (options['deterministic']): no timing-dependent choice that changes numerics."""
    import torch._inductor.config as inductor_config

    wanted = {"emulate_precision_casts": True, "realize_reads_threshold": 8}
    patches = {k: v for k, v in wanted.items() if hasattr(inductor_config, k)}
    if hasattr(getattr(inductor_config, "eager_numerics", None), "division_rounding"):
        patches["eager_numerics.division_rounding"] = True
    elif hasattr(inductor_config, "emulate_divison_rounding"):
        patches["emulate_divison_rounding"] = True
    if deterministic:
        patches["deterministic"] = True
    return inductor_config.patch(patches)


def _release_replaced(gm: torch.fx.GraphModule, example_inputs, report: GraphReport, plan: QuantPlan) -> int:
    """Free the storage of parameters that only replaced linears read in this graph (never a
    skipped layer's, never one sharing storage with an input the graph still reads)."""
    from fq_compile.passes.match import layer_name, placeholder_inputs
    from fq_compile.runtime.resident import is_released, release, storage_of

    runtime = placeholder_inputs(gm, example_inputs)
    used = {storage_of(t).data_ptr() for n, t in runtime.items()
            if n.users and isinstance(t, torch.Tensor) and storage_of(t).nbytes()}
    freed = 0
    for fqn, node in report.replaced_params.items():
        t = runtime.get(node)
        if (not isinstance(t, torch.Tensor) or node.users or layer_name(fqn) in plan.skipped or is_released(t)
                or storage_of(t).data_ptr() in used):
            continue
        freed += release(t, fqn)
    return freed
