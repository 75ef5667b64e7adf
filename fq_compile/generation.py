"""`generate()` through the flattenquant backend, and where CUDA graphs apply.

Both forms a user writes run the quantized model inside Hugging Face's `generate()`:

    fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    fast.generate(input_ids, max_new_tokens=128, cache_implementation="static")

    model.compile(backend="flattenquant", options={"plan": plan})
    model.generate(input_ids, max_new_tokens=128, cache_implementation="static")

Why the first form needs help, and what the help is.  `torch.compile(model)` returns an
OptimizedModule whose *forward* is compiled; every other attribute, `generate` included, is
forwarded to the original module, whose own calls are not compiled.  So `fast.generate()` ran the
floating-point model (or, once weights were freed, failed), with no warning.  Neither PyTorch nor
the backend interface gives a backend any hook at `torch.compile(model)` time (a backend only sees
FX graphs, when they are first called), so the form cannot be fixed inside the backend.  Options
considered:
  * make `torch.compile(model)` compile the module in place (`model.compile()`'s mechanism): it
    would also compile every later call of the user's *original* model, which CPU users keep to
    compare against (why `free_weights` defaults to False there);
  * Hugging Face's own compile path (generation_config.compile_config, `get_compiled_call`): it
    compiles only the decode steps, only for static caches on accelerators, and runs the prefill
    uncompiled: with freed weights that prefill cannot run, and with kept weights it is floating
    point;
  * raise an error from `fast.generate`: needs the same interception as making it work.
What we do: importing fq_compile (which `backend="flattenquant"` does through its entry point, at
the latest when torch.compile resolves the name) installs four narrow hooks.  The first wraps
`OptimizedModule.__getattr__` once, for one name: `generate` on a module compiled with this
backend returns the original module's `generate` with, for the duration of that call only, the
original module's calls routed through the compiled module's Dynamo context -- exactly what
`model.compile()` installs permanently (`Module._compiled_call_impl`), so both forms share one
mechanism and one set of compiled graphs; the call also checks the quantized weights once per graph,
at its first forward, instead of at every step (runtime/guards.py's checked_once), and traces a static
cache's tensor length into the graph instead of breaking it (`static_cache_initialized`).  Every other
attribute, and every OptimizedModule of another backend, is untouched.  Routing is per call and per
object: a thread running the original module while `fast.generate` runs would be routed too.

The second form compiles every call of the module (`model.compile()`), the prefill and each decode
step included.  One thing breaks both forms: for static caches on CUDA, Hugging Face's generate()
compiles the decode steps itself (`torch.compile(self.__call__, backend="inductor",
mode="reduce-overhead")`), and Dynamo, tracing that call, inlines a nested compiled function
instead of calling it: the decode steps would run the floating-point graph through Inductor
(tests/test_generate.py shows the changed tokens).  So the second hook: Hugging Face's
`GenerationMixin._valid_auto_compile_criteria` answers False for a model whose calls this backend
already compiles (`Module._compiled_call_impl` made by torch.compile with backend='flattenquant',
or fast.generate's routing); for every other model it answers as before.  (The routed call is also
wrapped in torch._dynamo.disable, so that an outer Dynamo context cannot inline it.)

Deferred stop check (`options={"defer_stop": ...}`, True by default).  Hugging Face's greedy loop
(`GenerationMixin._sample`) asks after every token whether all sequences have stopped
(`StopCheck`: `bool(unfinished_sequences.max() == 0)`), which waits until the GPU has finished the
step: the host cannot queue the next step's launches meanwhile.  Measured on an H100 (OPT-13B
shapes, batch 1, through this backend): 6 ms of each 15.7 ms decode step was GPU idle time from
that wait.  transformers (>= 5.17) has the remedy, `DeferredStopCheck`: the stop flag is copied to
pinned host memory without blocking and read one step later, so the host queues step i+1 while the
GPU runs step i; Hugging Face enables it only on "mps".  The third hook turns it on for CUDA, for a
model whose calls this backend compiles: the `_valid_auto_compile_criteria` wrapper, which `_sample`
calls right before the prefill, records in a context variable whether this generate() may defer
(compiled by this backend, defer_stop True; every call sets it, so one generate()'s answer never
reaches the next), and `DeferredStopCheck.is_supported`, called right after the prefill, reads and
clears it: set and on CUDA, it answers Hugging Face's own rule for the device where Hugging Face
defers (not for an assistant model; a cache that generate() returns must be croppable, so the extra
step can be undone); otherwise it answers as before.  The cost: a generate() whose sequences all
stop at EOS before max_new_tokens runs one more decode step, whose token `DeferredStopCheck.finish`
drops (and whose cache entry, where the cache is returned), and a streamer receives each token one
step late.  CUDA only: the CPU has no events (torch.Event refuses it; DeferredStopCheck needs one)
and its steps run synchronously anyway, so there is nothing to overlap; other devices keep Hugging
Face's own rule.  Tokens are the same either way (tests/test_generate.py).

CUDA graphs (`options={"cudagraphs": ...}`; `mode="reduce-overhead"` cannot reach a backend together
with options, see backend.py):
  "auto" (default)  CUDA graphs (Inductor's cudagraph trees) for every graph on CUDA that updates a
                    static-address input in place -- a static KV cache created outside the
                    compiled call (`cache_implementation="static"` through `fast.generate`, which
                    initializes the cache before the first compiled call, or a user's
                    early-initialized StaticCache).  That is exactly where Hugging Face's own
                    `generate()` uses CUDA graphs, and where they pay: one decode step is a few
                    milliseconds of weight streaming split over hundreds of kernel launches.
                    Other graphs run without: a CUDA graph's outputs live in a pool that its next
                    replay overwrites (a dynamic cache keeps its tensors across calls; user code
                    keeps logits), its activation pool stays reserved, and the dynamic cache's
                    decode graphs change shape every token (one recording per length).
  True              every graph on CUDA, as Inductor's mode="reduce-overhead" does (the caller
                    takes on the overwrite rule above);
  False             never.
A static cache created *inside* the first compiled call (`model.compile()` form with
cache_implementation="static": Hugging Face creates the cache lazily in the first forward) is not
a static address, so "auto" leaves those graphs without CUDA graphs and warns once, naming the form
that gets them.  `fast.generate` initializes a static cache before the first compiled call (only on
CUDA with CUDA graphs allowed).  The cache's length is then a tensor from the first call on, and
OPT's decoder (transformers 5.x), given no attention mask (generate() drops an all-ones one), builds
a dead `torch.ones(batch, cache.get_seq_length() + new)` from it: a data-dependent size, which broke
the prefill graph (on the CPU with the cache initialized so, 5 breaks; the H100 recorded 3 for ours at
OPT-13B), each piece a graph for the first call to compile.  So a routed generate() traces `.item()` into
the graph (Dynamo's capture_scalar_outputs, from its first forward given an initialized static cache to its
end: `static_cache_initialized`); decode steps never reach that line.  transformers 5.17's OPT also hands
that mask to `create_causal_mask`, whose padding branch on its length then breaks the prefill once per call
(5.25 does not: benchmarks/NOTES-decode.md).

One static cache per model (the fourth hook, CUDA with CUDA graphs only).  transformers 5 creates a new
StaticCache in every generate() (`GenerationMixin._prepare_static_cache`); its key, value and length
tensors are static addresses, and Inductor's cudagraph trees re-record (warm up and capture again) every
graph whose static inputs moved.  So a call ran at replay speed only when the allocator happened to hand
back the previous call's addresses: on an H100 (OPT-13B shape, O3, batch 1) the five timed calls took
1688 / 995 / 1691 / 996 / 1002 ms (benchmarks/results/e2e-decode-13b-2026-12-07-h100-e5d5697.md; the cause
is read from the code and the CPU, where the previous call's cache was still alive in a garbage cycle when the
next one allocated: e2e.py counts the graphs each call records, so a GPU run confirms or refutes it).  The hook keeps the cache a model's
generate() created and hands it back, reset (zeroed in place, Hugging Face's `Cache.reset`), to the next
generate() that asks for the same one (implementation, batch size, length, chunking, dtype, device), as
transformers 4 did with `model._cache`.  It is handed back only when nothing but the hook holds it: a
cache the caller kept (`return_dict_in_generate=True`'s `past_key_values`) is never reset under them,
and that generate() gets a new one.  The price: the last cache stays allocated after generate() returns,
until the model is freed or `release_static_cache(model)` is called.  Elsewhere (the CPU, cudagraphs
False, a model not compiled by this backend) generate() creates its cache as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import operator
import sys
import warnings
import weakref

import torch
import torch.fx as fx

from fq_compile.runtime.guards import checked_once

CUDAGRAPH_CHOICES = ("auto", True, False)

# in-place updates of an input through a view still update the input
_VIEW_METHODS = {"view", "reshape", "select", "narrow", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                 "as_strided", "__getitem__", "view_as", "unflatten", "flatten", "t", "detach"}
_VIEW_FUNCTIONS = {operator.getitem, torch.select, torch.narrow, torch.transpose, torch.permute, torch.reshape,
                   torch.unsqueeze, torch.squeeze, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.__getitem__}
_warned: set[str] = set()


# ------------------------------------------------------------------------------------------------
# which graphs get CUDA graphs
# ------------------------------------------------------------------------------------------------

def parse_cudagraphs(value, mode=None):
    """The `cudagraphs` option: "auto" | True | False (None: auto); mode="reduce-overhead" means True."""
    if mode == "reduce-overhead":
        if value is False:
            raise ValueError("mode='reduce-overhead' asks for CUDA graphs but options['cudagraphs'] is False")
        return True
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"options['cudagraphs'] must be 'auto', True or False, got {value!r}")


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target is operator.setitem:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__") and getattr(node.target, "__module__", "") in (
            None, "torch", "torch._C._TensorBase", "torch._tensor")
    return False


def _base_placeholder(node) -> fx.Node | None:
    seen = 0
    while isinstance(node, fx.Node) and seen < 32:
        if node.op == "placeholder":
            return node
        if not node.args:
            return None
        if node.op == "call_method" and node.target in _VIEW_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
            node = node.args[0]
        else:
            return None
        seen += 1
    return None


def mutated_inputs(gm: fx.GraphModule, example_inputs) -> list[tuple[fx.Node, object]]:
    """The placeholders (with their runtime values) that the graph updates in place."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    runtime = dict(zip(phs, example_inputs))
    out = {}
    for node in gm.graph.nodes:
        if _is_inplace(node) and node.args:
            ph = _base_placeholder(node.args[0])
            if ph is not None:
                out[ph] = runtime.get(ph)
    return list(out.items())


def _static_address(node: fx.Node, t) -> bool:
    """Marked by its owner with torch._dynamo.mark_static_address (a static KV cache does this)."""
    if getattr(t, "_dynamo_static_input_type", None):
        return True
    return bool((node.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type"))


def cudagraph_patches(choice, gm: fx.GraphModule, example_inputs, index: int = 0, on_cuda: bool | None = None) -> dict:
    """Inductor config patches for one graph under the `cudagraphs` choice (module docstring);
    on_cuda: whether the graph runs on CUDA (None: any example input on CUDA)."""
    if on_cuda is None:
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if choice is False or not on_cuda:
        return {}
    if choice is True:
        return {"triton.cudagraphs": True}
    mutated = [(n, t) for n, t in mutated_inputs(gm, example_inputs)
               if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
    if not mutated:
        return {}
    if all(_static_address(n, t) for n, t in mutated):
        return {"triton.cudagraphs": True}
    names = ", ".join(sorted(n.name for n, t in mutated if not _static_address(n, t)))[:200]
    _warn_once("lazy-cache", f"graph {index} updates inputs in place that are not static addresses ({names}), "
               "so it runs without CUDA graphs. A static KV cache created inside the first compiled call "
               "(model.compile() + generate(cache_implementation='static')) is such an input: call "
               "fast = torch.compile(model, backend='flattenquant', options=...) and fast.generate(...), which "
               "initializes the cache first, or pass an early-initialized StaticCache.")
    return {}


def _warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fq_compile: {msg}", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# fast.generate
# ------------------------------------------------------------------------------------------------

def backend_options(obj) -> dict | None:
    """The options of `obj`'s torch.compile when it was compiled with backend='flattenquant', else
    None.  `obj`: an OptimizedModule, or the callable `model.compile()` stores in
    `Module._compiled_call_impl`.  Walks the Dynamo context to the torch.compile wrapper that holds
    the backend and its kwargs (bounded, over known attribute names and closure cells)."""
    from fq_compile.backend import flattenquant

    if getattr(obj, _ROUTED, None) is not None:
        return backend_options(getattr(obj, _ROUTED))
    seen, frontier = set(), [obj.__dict__.get("dynamo_ctx") if isinstance(obj, torch.nn.Module) else obj]
    for _ in range(10):
        nxt = []
        for o in frontier:
            if o is None or id(o) in seen or isinstance(o, (torch.nn.Module, torch.Tensor, str, int, float)):
                continue
            seen.add(id(o))
            if getattr(o, "compiler_fn", None) is flattenquant:
                kw = getattr(o, "kwargs", None) or {}
                return dict(kw.get("options") or {}, **({"mode": kw["mode"]} if kw.get("mode") else {}))
            if o is flattenquant:
                return {}
            for a in ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "_torchdynamo_orig_callable",
                      "_inner_convert", "compiler_fn", "_orig_backend"):
                nxt.append(getattr(o, a, None))
            for cell in getattr(o, "__closure__", None) or ():
                try:
                    nxt.append(cell.cell_contents)
                except ValueError:       # an empty cell
                    pass
        frontier = nxt
    return None


def compiled_by_backend(model) -> bool:
    """Whether `model`'s calls run through this backend (model.compile(), or fast.generate's routing)."""
    return _calls_options(model) is not None


def _calls_options(model) -> dict | None:
    """The backend options of the compile that `model`'s calls run through, None if not this backend's."""
    fn = getattr(model, "_compiled_call_impl", None)
    return None if fn is None else backend_options(fn)


_ROUTED = "_fq_routed_from"


def _compiled_call(fast) -> object:
    """The original module's `_call_impl` under `fast`'s Dynamo context (created once per `fast`):
    what `model.compile()` stores in `Module._compiled_call_impl`."""
    d = fast.__dict__
    fn = d.get("_fq_compiled_call_impl")
    if fn is None:
        orig = d["_modules"]["_orig_mod"]
        fn = d["_fq_compiled_call_impl"] = fast.dynamo_ctx(orig._call_impl)
    return fn


def _routed_generate(fast):
    orig = fast.__dict__["_modules"]["_orig_mod"]
    generate = orig.generate
    options = backend_options(fast) or {}
    try:
        cudagraphs = parse_cudagraphs(options.get("cudagraphs"), options.get("mode"))
    except ValueError:
        cudagraphs = False      # the backend reports the bad option at the first compiled call

    @functools.wraps(generate)
    def routed(*args, **kwargs):
        if orig._compiled_call_impl is not None:   # model.compile() was used too: its own routing
            return generate(*args, **kwargs)
        compiled = _compiled_call(fast)
        # Dynamo's capture_scalar_outputs for the rest of this generate(), from its first forward given an
        # initialized static cache (module docstring, on OPT's prefill): entered once, not at every decode
        # step (a config patch costs ~18 us of host time a call)
        lengths, traced = contextlib.ExitStack(), []

        # not traced by whatever Dynamo context is active around the call (Hugging Face's own
        # decode-step compile, for static caches on CUDA): the cache is initialized eagerly and
        # our compiled callable installs its own context
        @torch._dynamo.disable
        def call(*a, **kw):
            if cudagraphs is not False and _on_cuda(a, kw):   # only CUDA graphs need it (module docstring)
                init_static_caches(orig, a, kw)
            if not traced and static_cache_initialized(kw):
                lengths.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))
                traced.append(True)
            return compiled(*a, **kw)

        setattr(call, _ROUTED, fast)

        orig._compiled_call_impl = call
        try:
            with checked_once(), lengths:   # the weights are checked at the first call, not at every step
                return generate(*args, **kwargs)
        finally:
            orig._compiled_call_impl = None

    return routed


def _static_caches(kwargs) -> list:
    """The caches among a forward's keyword arguments that can hold static layers (StaticCache and kin)."""
    return [v for v in kwargs.values() if hasattr(v, "early_initialization") and hasattr(v, "layers")]


def static_cache_initialized(kwargs) -> bool:
    """Whether a forward's keyword arguments hold a static cache whose tensors exist already (so its length
    is a tensor, traced into the graph by the routed generate(): module docstring, on OPT's prefill)."""
    return any(getattr(l, "is_compileable", False) and getattr(l, "is_initialized", False)
               for cache in _static_caches(kwargs) for l in cache.layers)


def _on_cuda(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in (*args, *kwargs.values()))


def init_static_caches(model, args, kwargs) -> None:
    """Initialize a static KV cache passed to `model`'s forward before the compiled call, as
    Hugging Face's StaticCache.early_initialization does: its tensors are then created outside the
    compiled graph and marked as static addresses (what CUDA graphs need), instead of lazily inside
    the first compiled call.  Caches without uninitialized static layers are left alone."""
    caches = _static_caches(kwargs)
    if not caches:
        return
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    if not isinstance(ids, torch.Tensor):
        return
    for cache in caches:
        pending = [l for l in cache.layers if getattr(l, "is_compileable", False)
                   and not getattr(l, "is_initialized", True) and getattr(l, "supports_early_init", True)]
        if not pending:
            continue
        shape = _kv_shape(model)
        if shape is None:
            return
        try:
            cache.early_initialization(batch_size=ids.shape[0], num_heads=shape[0], head_dim=shape[1],
                                       dtype=model.dtype, device=ids.device)
        except (TypeError, ValueError, NotImplementedError) as e:   # a cache layout we do not know: lazy init
            _warn_once("early-init", f"could not initialize the static cache before the compiled call "
                       f"({type(e).__name__}: {e}); it is created inside the first compiled call instead")


def _kv_shape(model):
    """(key/value heads, head dim) of the model's attention, from Hugging Face's helper when it has
    one, else from the config (every layer alike)."""
    helper = getattr(model, "_get_static_cache_init_shape", None)
    if callable(helper):
        return helper()
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv, head_dim


_INSTALLED = "_fq_compile_generate_hook"


def install() -> None:
    """The four hooks of the module docstring, once per process: `generate` of modules compiled with
    backend='flattenquant' is routed, Hugging Face's own decode-step compile is skipped for a model
    whose calls this backend already compiles, such a model's generate() on CUDA defers its stop
    check and reuses its static cache.  Everything else keeps its own behaviour."""
    _install_generate_routing()
    _install_hf_compile_guard()
    _install_deferred_stop()
    _install_cache_reuse()


# Whether the generate() running in this context may defer its stop check (module docstring): set by
# every `_valid_auto_compile_criteria` call, which `_sample` makes right before the prefill, and read
# and cleared by `DeferredStopCheck.is_supported`, which it calls right after.
_DEFER_STOP: contextvars.ContextVar[bool] = contextvars.ContextVar("fq_compile_defer_stop", default=False)


def _generation_method(name: str):
    """(GenerationMixin, its method `name`) to wrap, or None: a transformers without it, or already wrapped."""
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    original = getattr(GenerationMixin, name, None)
    if original is None or getattr(original, _INSTALLED, False):
        return None
    return GenerationMixin, original


def _install_hf_compile_guard() -> None:
    found = _generation_method("_valid_auto_compile_criteria")
    if found is None:
        return
    GenerationMixin, original = found

    @functools.wraps(original)
    def _valid_auto_compile_criteria(self, *args, **kwargs):
        options = _calls_options(self)
        _DEFER_STOP.set(options is not None and options.get("defer_stop", True) is True)
        if options is not None:
            return False
        return original(self, *args, **kwargs)

    setattr(_valid_auto_compile_criteria, _INSTALLED, True)
    GenerationMixin._valid_auto_compile_criteria = _valid_auto_compile_criteria


# The static cache each model's last generate() created, with what it was made for (module docstring).
_KEPT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
STABLE_CACHE_DEVICES = ("cuda",)      # where a cache's addresses matter (CUDA graphs)
_COLLECT_IN_VAIN: weakref.WeakSet = weakref.WeakSet()     # models whose last gc.collect() freed no kept cache


def release_static_cache(model) -> None:
    """Drop the static KV cache kept for `model` between generate() calls (module docstring)."""
    _KEPT_CACHES.pop(model, None)


def _keeps_static_cache(model) -> bool:
    options = _calls_options(model)
    if options is None or torch.device(model.device).type not in STABLE_CACHE_DEVICES:
        return False
    try:
        return parse_cudagraphs(options.get("cudagraphs"), options.get("mode")) is not False
    except ValueError:
        return False


def _only_kept(model, kept: tuple) -> bool:
    """Whether nothing but `_KEPT_CACHES` holds the kept cache (counted: the tuple and getrefcount's
    argument).  Garbage counts too until collected (what Dynamo traced in a generate() that compiled can sit
    in reference cycles: seen on the CPU), so a count above that is checked again after one gc.collect() --
    unless the previous collect for this model freed nothing (a caller who keeps every returned cache would
    otherwise pay a full collection per call)."""
    if sys.getrefcount(kept[1]) == 2:
        return True
    if model in _COLLECT_IN_VAIN:
        return False
    gc.collect()
    if sys.getrefcount(kept[1]) == 2:
        return True
    _COLLECT_IN_VAIN.add(model)
    return False


def cudagraphs_recorded(device) -> int | None:
    """CUDA graphs Inductor's cudagraph trees hold for `device` (every recorded node of every tree;
    None off CUDA or where the trees' internals differ).  A timed generate() that raises it re-recorded:
    what made issue 23's timed calls bimodal ("One static cache per model" above)."""
    if device.type != "cuda":
        return None
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        if manager is None:
            return 0
        todo, count = [n for nodes in manager.roots.values() for n in nodes], 0
        while todo:
            node = todo.pop()
            count += 1
            todo.extend(c for nodes in node.children.values() for c in nodes)
        return count
    except Exception:  # private API: no count rather than no benchmark
        return None


def _install_cache_reuse() -> None:
    """Wrap `GenerationMixin._prepare_static_cache` (module docstring); a transformers without it keeps
    its own behaviour."""
    found = _generation_method("_prepare_static_cache")
    if found is None:
        return
    GenerationMixin, original = found

    @functools.wraps(original)
    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        def build():
            return original(self, cache_implementation=cache_implementation, batch_size=batch_size,
                            max_cache_len=max_cache_len, prefill_chunk_size=prefill_chunk_size,
                            model_kwargs=model_kwargs)

        if not _keeps_static_cache(self) or self.config.is_encoder_decoder:
            return build()
        length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))    # Hugging Face's rule
        made_for = (cache_implementation, batch_size, length, prefill_chunk_size, self.dtype, torch.device(self.device))
        kept = _KEPT_CACHES.get(self)
        if kept is not None and kept[0] == made_for and _only_kept(self, kept):
            _COLLECT_IN_VAIN.discard(self)
            kept[1].reset()
            self._previous_max_cache_length = length
            return kept[1]
        cache = build()
        _KEPT_CACHES[self] = (made_for, cache)
        return cache

    setattr(_prepare_static_cache, _INSTALLED, True)
    GenerationMixin._prepare_static_cache = _prepare_static_cache


def _install_deferred_stop() -> None:
    """Wrap `DeferredStopCheck.is_supported` (a staticmethod, kept one) so that it consumes the
    context's flag (module docstring); a transformers without DeferredStopCheck (< 5.17) keeps its
    per-step check."""
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        return
    original = DeferredStopCheck.__dict__.get("is_supported")
    if not isinstance(original, staticmethod) or getattr(original.__func__, _INSTALLED, False):
        return
    original = original.__func__

    @functools.wraps(original)
    def is_supported(device, *args, **kwargs):
        wanted = _DEFER_STOP.get()
        _DEFER_STOP.set(False)          # one answer per generate(): the flag never outlives the call that set it
        if wanted and torch.device(device).type == "cuda":
            # Hugging Face's rule for the device where it defers, which is all of it but the device
            # test: never for an assistant model, and a cache that generate() returns (asked for, or
            # passed in by the user) must be croppable, so that the extra step can be undone
            return original(torch.device("mps"), *args, **kwargs)
        return original(device, *args, **kwargs)

    setattr(is_supported, _INSTALLED, True)
    DeferredStopCheck.is_supported = staticmethod(is_supported)


def _install_generate_routing() -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    original = OptimizedModule.__getattr__
    if getattr(original, _INSTALLED, False):
        return

    @functools.wraps(original)
    def __getattr__(self, name):
        if name == "generate" and backend_options(self) is not None:
            orig = self.__dict__["_modules"]["_orig_mod"]
            if hasattr(orig, "generate"):
                return _routed_generate(self)
        return original(self, name)

    setattr(__getattr__, _INSTALLED, True)
    OptimizedModule.__getattr__ = __getattr__
