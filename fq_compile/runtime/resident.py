"""What stays in device memory once a model runs through the flattenquant backend.

After the rewrite, a quantized linear's floating-point weight is no longer read by its graph: the
graph reads the plan's packed INT8/INT4 weight instead.  The parameter still reaches the compiled
code as an (unused) input, so Dynamo's guards must keep seeing a tensor of the same shape, stride
and dtype; we therefore free only its *storage* (`untyped_storage().resize_(0)`, as FSDP does for
unsharded parameters): the metadata stays, the bytes go back to the allocator, and no recompile is
triggered.  Later recompiles fakeify the freed parameter like any other (only metadata is read)
and name it through the registry below, since its values -- which the plan's fingerprint check
and the frame-prefix search would read -- are gone.

Consequences a user sees (documented on the backend's `free_weights` option):
  * the *un-compiled* module can no longer run: its quantized linears raise (the eager-run guard
    of runtime/guards.py says why; without it PyTorch's "... out of bounds for storage of size 0");
    `state_dict()` of those weights is meaningless;
  * weights that any other op reads (tied weights, lm_head / embeddings, skipped layers) and norm
    weights (folds read them at every recompile) are never freed.

Plan tensors are moved to a device once per (plan, device) (runtime/state.py) and shared by every
graph and recompile, so a recompile costs no second copy of the quantized weights.

A model loaded from a quantized artefact (fq_compile/deploy.py) never had those weights: each
quantized layer's weight is a `placeholder`, a tensor of the right shape, stride, dtype and device
whose storage holds no bytes, registered here like a released weight (origin "artefact") together
with the fingerprint its artefact vouches for.  The rewrite accepts it only for a plan made from
weights of that fingerprint (passes/lower.py), and the eager-run guard names the artefact when the
un-compiled module is called.
"""

from __future__ import annotations

import weakref

import torch

from fq_compile.runtime.state import plan_tensors
from fq_compile.runtime.tensor_parallel import local_tensor

# id(tensor) -> (weakref to it, fully-qualified parameter name, vouched fingerprint or None, origin);
# entries die with their tensor.  origin: "compile" (freed after compiling), "artefact" (a placeholder)
_RELEASED: dict[int, tuple[weakref.ref, str, str | None, str]] = {}


def storage_of(t: torch.Tensor):
    """The storage holding `t`'s bytes on this process (a DTensor's: its local shard's)."""
    return local_tensor(t).untyped_storage()


def is_released(t) -> bool:
    """True for a tensor whose storage was freed (by us or anyone else: its bytes cannot be read)."""
    return isinstance(t, torch.Tensor) and local_tensor(t).numel() > 0 and storage_of(t).nbytes() == 0


def _entry(t):
    entry = _RELEASED.get(id(t))
    return None if entry is None or entry[0]() is not t else entry


def released_name(t) -> str | None:
    """The parameter name recorded when `t`'s storage was released here, else None."""
    entry = _entry(t)
    return None if entry is None else entry[1]


def released_origin(t) -> str | None:
    """"compile" (freed after its graph was compiled), "artefact" (a placeholder of a model loaded
    from a quantized artefact), or None where `t` is not in the registry."""
    entry = _entry(t)
    return None if entry is None else entry[3]


def vouched_fingerprint(t) -> str | None:
    """The fingerprint of the floating-point values a placeholder stands for (its artefact's plan
    was made from them), else None."""
    entry = _entry(t)
    return None if entry is None else entry[2]


def placeholder(shape, stride, dtype: torch.dtype, device, name: str, fingerprint: str) -> torch.nn.Parameter:
    """A parameter of this shape, stride, dtype and device that holds no bytes, registered under
    `name` and vouched for by `fingerprint`.  Its storage is allocated and freed at once, never
    written (on the CPU its pages are never touched; on CUDA the block goes back to the caching
    allocator, where the next placeholder reuses it)."""
    p = torch.nn.Parameter(torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device))
    release(p, name, origin="artefact", fingerprint=fingerprint)
    return p


def release(t: torch.Tensor, name: str, origin: str = "compile", fingerprint: str | None = None) -> int:
    """Free `t`'s storage, keep its metadata, remember its name; returns the bytes freed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"release() expects a tensor, got {type(t).__name__}")
    storage = storage_of(t)
    freed = storage.nbytes()
    if freed:
        storage.resize_(0)
    key = id(t)

    def _forget(ref, key=key):
        if _RELEASED.get(key, (None,))[0] is ref:
            del _RELEASED[key]

    _RELEASED[key] = (weakref.ref(t, _forget), name, fingerprint, origin)
    return freed


def _unique_storage_bytes(tensors, device) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device != device:
            continue
        s = storage_of(t)
        key = (s.data_ptr(), s.nbytes())
        if s.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def resident_bytes(model: torch.nn.Module, plan=None, device=None) -> dict[str, int]:
    """Bytes on `device` (default: the device of the model's first parameter) held by the model's
    parameters and buffers (freed storages count 0, shared storages once) and by the plan's tensors
    that live there.  Returns {"model": ..., "plan": ..., "total": ...}."""
    params = list(model.parameters()) + list(model.buffers())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    m = _unique_storage_bytes(params, device)
    p = _unique_storage_bytes(plan_tensors(plan), device) if plan is not None else 0
    total = _unique_storage_bytes(params + (plan_tensors(plan) if plan else []), device)
    return {"model": m, "plan": p, "total": total}
