"""Run-time checks that keep a compiled model from silently computing something else than its plan.

    fingerprint      plan.weight_fingerprint, cached per (tensor, version counter, storage)
    WeightGuard      wraps each graph the backend compiles.  The rewrite consumed the values of some
                     parameters at compile time (a quantized linear's weight and bias live on as the
                     plan's integer copies; a folded norm's weight as a graph constant), so Dynamo's
                     guards, which look only at shapes and dtypes, would let the graph run on after
                     those parameters change in place (`mul_`, `zero_`, `load_state_dict`, an
                     optimizer step).  Before every call the guard compares each such parameter's
                     identity and version counter with what it saw last (two attribute reads per
                     parameter); on any difference it fingerprints the values again and raises
                     PlanMismatchError naming the parameter unless they are unchanged.
                     It reads no tensor values on the common path, so it adds no device work and is
                     indifferent to CUDA graphs replaying the compiled code underneath.  Inside one
                     `checked_once()` scope (fast.generate() opens one per call: fq_compile/generation.py)
                     each guard checks on its first call only: the decode steps of one generate() run
                     with the weights the first step saw (the check reads two attributes of every
                     watched parameter, ~0.26 ms a step at 640 parameters on a CPU: a 40-layer OPT).
    eager guards     forward pre-hooks on the modules of quantized linears (installed by
                     calibrate and by the backend).  Compiled code never runs them (Dynamo traces
                     them to nothing).  When such a module runs as plain Python inside code that
                     flattenquant compiles while Dynamo is in run-only mode (a frame over its
                     recompile limit runs eagerly, and so does every frame it calls; also set_stance
                     ("eager_on_recompile")), its floating-point weight is about to be used instead
                     of the plan: the hook raises RecompileLimitError, saying what to do.  (Under
                     an active callback, e.g. after a graph break inside the layer's hooks, the
                     layer's forward is compiled as a frame of its own: nothing to do.)  With the
                     weights released (free_weights), it also makes the un-compiled module fail
                     with a clear message, and so does a model loaded from a quantized
                     artefact (fq_compile/deploy.py: load_quantized installs them).  Plain eager
                     calls of the model, and models compiled with other backends, are not affected.

Runtime state only: nothing here is stored on the plan.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
import sys
import weakref

import torch

from fq_compile.plan import PlanMismatchError, stale_message, weight_fingerprint
from fq_compile.runtime.resident import is_released, released_origin
from fq_compile.runtime.tensor_parallel import local_tensor


class RecompileLimitError(RuntimeError):
    """A layer of a model compiled with backend='flattenquant' was about to run un-quantized."""


# -- fingerprints ---------------------------------------------------------------------------------------

_FP_CACHE: dict[int, tuple[weakref.ref, tuple, str]] = {}


def _state(t: torch.Tensor) -> tuple | None:
    """What identifies the current values of `t` cheaply: version counter, data pointer, dtype,
    shape, strides.  None where PyTorch keeps no version counter (inference tensors)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return version, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())


def fingerprint(t: torch.Tensor) -> str:
    """weight_fingerprint(t), computed once per version of the tensor in this process; for a
    DTensor, its local shard's (no collective: see runtime/tensor_parallel.py)."""
    t = local_tensor(t)
    key, state = id(t), _state(t)
    hit = _FP_CACHE.get(key)
    if state is not None and hit is not None and hit[0]() is t and hit[1] == state:
        return hit[2]
    fp = weight_fingerprint(t)
    if state is not None:
        def _forget(ref, key=key):
            if _FP_CACHE.get(key, (None,))[0] is ref:
                del _FP_CACHE[key]

        _FP_CACHE[key] = (weakref.ref(t, _forget), state, fp)
    return fp


# -- stale weights ------------------------------------------------------------------------------------

# The scope of a checked_once() block (an object compared by identity), or None outside any.
_SCOPE: contextvars.ContextVar[object | None] = contextvars.ContextVar("fq_compile_weight_guard_scope", default=None)


@contextlib.contextmanager
def checked_once():
    """Within this block each WeightGuard checks its parameters on its first call only (see the module
    docstring): for a loop of calls that nothing between them can change the weights of, such as the
    decode steps of one generate().  Nested blocks open a scope of their own."""
    token = _SCOPE.set(object())
    try:
        yield
    finally:
        _SCOPE.reset(token)


class WeightGuard:
    """Calls `compiled(*args)` after checking the watched arguments (see the module docstring).

    watched: [(argument index, parameter name, expected fingerprint)].  Per call and watched
    tensor: its identity and version counter (shape, dtype, device and strides are Dynamo's own
    guards).  Not seen: `param.data = other_tensor` of the same shape,
    which PyTorch does not count as a new version."""

    def __init__(self, compiled, args, watched: list[tuple[int, str, str]]):
        self.compiled = compiled
        self.watched = [(i, name, expected) for i, name, expected in watched if isinstance(args[i], torch.Tensor)]
        index = [i for i, _, _ in self.watched]
        pick = operator.itemgetter(*index) if index else (lambda a: ())
        self.pick = (lambda a: (pick(a),)) if len(index) == 1 else pick
        ts = self.pick(args)
        self.ids = list(map(id, ts))
        self.versions = [self._version(t) for t in ts]
        self.scope = None          # the checked_once() scope this guard last checked in
        self.__name__ = getattr(compiled, "__name__", "flattenquant_graph")

    @staticmethod
    def _version(t) -> int:
        try:
            return t._version
        except RuntimeError:      # an inference tensor keeps no version counter: check its values every call
            return -1

    def __call__(self, *args):
        scope = _SCOPE.get()
        if scope is not None and scope is self.scope:
            return self.compiled(*args)
        ts = self.pick(args)
        try:
            same = list(map(id, ts)) == self.ids and list(map(_VERSION, ts)) == self.versions
        except RuntimeError:      # an inference tensor among them
            same = False
        if not same:
            for k, t in enumerate(ts):
                if self.versions[k] < 0 or id(t) != self.ids[k] or self._version(t) != self.versions[k]:
                    self._recheck(k, t)
        self.scope = scope
        return self.compiled(*args)

    def _recheck(self, k, t):
        _, name, expected = self.watched[k]
        if not is_released(t):
            got = fingerprint(t)
            if got != expected:
                raise PlanMismatchError(stale_message(name, expected, got))
        self.ids[k], self.versions[k] = id(t), self._version(t)


_VERSION = operator.attrgetter("_version")


# -- eager runs of quantized layers -------------------------------------------------------------------

def _eval_frame_callback():
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
    except ImportError:      # pragma: no cover - every torch this package supports has it
        return None
    return get_eval_frame_callback()


def _is_flattenquant(callback) -> bool:
    """True when a Dynamo callback compiles with the flattenquant backend."""
    seen = 0
    obj = callback
    while obj is not None and seen < 16:
        if getattr(obj, "_fq_backend", False) or getattr(getattr(obj, "compiler_fn", None), "_fq_backend", False):
            return True
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
        seen += 1
    return False


def _inside_flattenquant_call(frame, max_depth: int = 512) -> bool:
    """True when the Python stack above `frame` runs code compiled with flattenquant: a call of a
    torch.compile'd function or module whose Dynamo callback compiles with flattenquant (the
    wrapper's frame in torch/_dynamo/eval_frame.py holds it), or a function that has graphs
    compiled by flattenquant (Dynamo keeps them per code object; a frame over its limit runs its
    original code).  Only consulted on the error path."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:      # pragma: no cover
        _debug_get_cache_entry_list = None
    seen = set()
    depth = 0
    while frame is not None and depth < max_depth:
        code = frame.f_code
        if code.co_filename.replace("\\", "/").endswith("torch/_dynamo/eval_frame.py"):
            if any(callable(v) and _is_flattenquant(v) for v in frame.f_locals.values()):
                return True
        elif code not in seen and _debug_get_cache_entry_list is not None:
            seen.add(code)
            try:
                entries = _debug_get_cache_entry_list(code)
            except Exception:
                entries = ()
            if any(_is_flattenquant(getattr(e, "backend", None)) for e in entries):
                return True
        frame = frame.f_back
        depth += 1
    return False


def _limit_hint() -> str:
    cfg = torch._dynamo.config
    limit = getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", "?"))
    params = inspect.signature(torch.compile).parameters
    per_compile = (" or torch.compile(..., recompile_limit=64" + (", isolate_recompiles=True" if
                   "isolate_recompiles" in params else "") + ")") if "recompile_limit" in params else ""
    return (f"Dynamo stopped compiling a frame of a model compiled with backend='flattenquant' (its recompile "
            f"limit, torch._dynamo.config.recompile_limit = {limit} graphs per function, was reached, or "
            "torch.compiler.set_stance('eager_on_recompile') is set) and ran it eagerly, in floating point. "
            "Compile with dynamic=True so that changes of batch size and length need no new graph, or raise the "
            f"limit before compiling (torch._dynamo.config.recompile_limit = 64{per_compile}); once the limit is "
            "hit, Dynamo does not compile this function again until torch._dynamo.reset(). TORCH_LOGS=recompiles "
            "shows why each graph was compiled")


class EagerGuard:
    """Forward pre-hook of a quantized linear's module (see the module docstring)."""

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(self, module, args):
        if torch.compiler.is_compiling():
            return None
        callback = _eval_frame_callback()
        if callback is False and _inside_flattenquant_call(sys._getframe(1)):
            raise RecompileLimitError(f"fq_compile: layer {self.layer} was about to run un-quantized. "
                                      + _limit_hint())
        w = getattr(module, "weight", None)
        if is_released(w) and released_origin(w) == "artefact":
            raise RuntimeError(
                f"fq_compile: {self.layer} was loaded from a quantized artefact (fq_compile.load_quantized), which "
                "holds its INT8/INT4 weight but not its floating-point one, so the un-compiled module cannot run: "
                "compile it, torch.compile(model, backend='flattenquant', options={'plan': model.fq_plan}), "
                "or load it with load_quantized(path, compile=True)")
        if is_released(w):
            raise RuntimeError(
                f"fq_compile: the floating-point weight of {self.layer} was released once its graph was "
                "compiled with backend='flattenquant' (free_weights, the default on CUDA), so the un-compiled "
                "module cannot run: call the compiled model, or compile with options={'free_weights': False}")
        return None


def _has_guard(module: torch.nn.Module) -> bool:
    return any(isinstance(h, EagerGuard) for h in module._forward_pre_hooks.values())


def guard_eager_runs(modules: dict[str, torch.nn.Module]) -> int:
    """Install an EagerGuard on each module that has none yet (copies of a guarded module carry
    theirs); returns how many were new."""
    new = 0
    for layer, module in modules.items():
        if not _has_guard(module):
            module.register_forward_pre_hook(EagerGuard(layer))
            new += 1
    return new


def remove_eager_guards(model: torch.nn.Module) -> int:
    """Remove the EagerGuard hooks from `model`'s modules (e.g. to compile it with another backend
    that is expected to fall back to eager); returns how many were removed."""
    removed = 0
    for module in model.modules():
        for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, EagerGuard)]:
            del module._forward_pre_hooks[key]
            getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
            removed += 1
    return removed
