"""Horizontal fusion of sibling linears: layers that read one input run as one GEMM over their weights
concatenated along N, the output split back to each layer's consumers.

    y   = fq.int8_linear(xq, cat(Wq_q, Wq_k, Wq_v), cat(scale_q, ...), cat(b_q, ...), dtype)  # or int4 / flat_linear
    q, k, v = y.narrow(-1, 0, Nq), y.narrow(-1, Nq, Nk), y.narrow(-1, Nq + Nk, Nv)

At decode sizes a narrow GEMM streams its weight well below copy bandwidth, so three launches of
N = 5120 cost more than one of N = 15360 (OPT-13B on the H100: q/k/v at 44% (INT4) / 76% (INT8) of copy
bandwidth, fc1 (N = 20480, same K') at 63% / 92%: benchmarks/results/kernels-decode-2026-12-07-h100-076f56c.md).

Which layers fuse (`sibling_runs`): the layers of one group (one input, so one channel map and K') in the
same flattened format and bits, with the same weight and scale dtypes, all with a bias or all without,
and the same output dtype; a group whose layers differ fuses only its equal ones.  Each output column
of an integer GEMM is exact and independent of the others (int32 accumulation, whatever the tiling or
split-K: kernels/triton/decode.py, gemm.py), and its epilogue reads only that column's scale and bias,
so the fused graph computes the unfused graph's bits.  Not fused, with the reason:
  * e4m3 layers (fp8, w4a8): float32 accumulation, whose order the GEMM (cuBLAS, Triton) may choose by N:
    a wider N could change the last bits;
  * tensor-parallel linears (passes/shard.py): each rank's local shard has its own layout and output wrap.

The concatenated tensors (`fused_tensors`) are made once per (plan, layers, device) at lowering time and
shared by every graph and recompile, as every plan tensor is (runtime/state.py).  The quantized weights
are not kept twice: where the plan's weights live on the graph's device (the CPU, or a model loaded from
a quantized artefact: deploy.py) each layer's `weight_q` becomes a row view of the concatenation, so the
separate tensors go; where the plan lives on the host and the graph on a GPU, the concatenation is the
only device copy, and each layer's device copy (runtime.state.device_tensor) is registered as a view of
it for any graph that does not fuse them.  Scales and biases (N floats) are concatenated copies.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from fq_compile.runtime.state import device_tensor, state_of

# why a layer fuses with no sibling, for the report (layers fused or with no equal sibling carry none)
NOT_E4M3 = "float32 accumulation (fp8, w4a8): a wider N may change the GEMM's summation order"
NOT_SHARDED = "tensor-parallel linear"


def fusion_key(lp, out_dtype, sharded: bool) -> tuple | None:
    """What must be equal for two layers of one group to share a GEMM; None: this layer never fuses."""
    if sharded or not lp.flattened:
        return None
    bias = None if lp.bias is None else lp.bias.dtype
    return (lp.format, lp.bits, lp.weight_q.dtype, lp.weight_q.shape[1], lp.weight_scale.dtype, bias, out_dtype)


def sibling_runs(members: list, keys: list) -> list[list]:
    """`members` (graph order) partitioned into runs of equal, non-None keys (each run in graph order,
    runs ordered by their first member); a layer with key None, or no equal sibling, is a run of one."""
    runs: dict = {}
    for i, (member, key) in enumerate(zip(members, keys)):
        runs.setdefault(("solo", i) if key is None else key, []).append(member)
    return list(runs.values())


def run_label(names: list[str]) -> str:
    """The run's layers by their last name part, e.g. 'q_proj+k_proj+v_proj' (the same in every block)."""
    return "+".join(n.rsplit(".", 1)[-1] for n in names)


def split_output(graph: fx.Graph, gemm: fx.Node, widths: list[int]) -> list[fx.Node]:
    """Each layer's columns of the fused GEMM's output, in order (views: no copy)."""
    out, start = [], 0
    for n in widths:
        out.append(graph.call_function(torch.narrow, (gemm, -1, start, n)))
        start += n
    return out


def fused_tensors(plan, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weights, epilogue scales, biases or None) of `names` concatenated along N, on `device`."""
    device = torch.device(device)
    layers = [plan.layers[n] for n in names]
    scale = _cached_cat(plan, "scale", names, [(id(lp.weight_scale), lp.act_scale) for lp in layers],
                        lambda: [lp.scale for lp in layers], device)
    bias = None
    if layers[0].bias is not None:
        bias = _cached_cat(plan, "bias", names, [id(lp.bias) for lp in layers], lambda: [lp.bias for lp in layers],
                           device)
    return _fused_weight(plan, names, device), scale, bias


def _cached_cat(plan, what: str, names, ident: list, parts, device) -> torch.Tensor:
    """cat(parts()) built once per plan (while the layers' tensors stay the same) and copied once per device."""
    key = f"fused:{'+'.join(names)}.{what}"
    cache = state_of(plan).constants
    ident = tuple(ident)
    if key not in cache or cache[key][0] != ident:
        ts = parts()
        cache[key] = (ident, torch.cat([t.to(ts[0].device) for t in ts]))
    return device_tensor(plan, key, cache[key][1], device)


def _fused_weight(plan, names: list[str], device: torch.device) -> torch.Tensor:
    """The layers' quantized weights as one [sum N, K'] tensor on `device`, held once (module docstring)."""
    layers = [plan.layers[n] for n in names]
    parts = [lp.weight_q for lp in layers]
    whole = _consecutive_rows(parts)
    if whole is not None and whole.device == device:
        return whole                      # fused by an earlier graph: the layers' weights are its rows
    if all(p.device == device for p in parts):
        whole = torch.cat(parts)
        for lp, rows in zip(layers, _rows(whole, parts)):
            lp.weight_q = rows            # the separate tensors go; the plan's values are unchanged
        return whole
    return _device_copy(plan, names, parts, device)


def _device_copy(plan, names, parts, device) -> torch.Tensor:
    """The concatenation copied to `device` once per plan; each layer's device copy is a view of it."""
    cache = state_of(plan).device_tensors
    key = (f"fused:{'+'.join(names)}.wq", str(device))
    hit = cache.get(key)
    if hit is None or len(hit[0]) != len(parts) or any(r() is not p for r, p in zip(hit[0], parts)):
        hit = cache[key] = (tuple(weakref.ref(p) for p in parts), torch.cat(parts).to(device))
    for name, p, rows in zip(names, parts, _rows(hit[1], parts)):
        own = cache.get((f"{name}.wq", str(device)))
        if own is None or own[0]() is not p:
            cache[(f"{name}.wq", str(device))] = (weakref.ref(p), rows)
    return hit[1]


def _rows(whole: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in parts:
        out.append(whole[start:start + p.shape[0]])
        start += p.shape[0]
    return out


def _consecutive_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks `parts` are, in order, if they are (a fusion made them so)."""
    base = parts[0]._base
    if base is None or base.dim() != 2 or base.shape[0] != sum(p.shape[0] for p in parts):
        return None
    offset = base.storage_offset()
    for p in parts:
        if p._base is not base or not p.is_contiguous() or p.storage_offset() != offset:
            return None
        offset += p.numel()
    return base
