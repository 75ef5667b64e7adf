"""Fold a ReLU that is a GEMM's only consumer into the GEMM's epilogue (OPT's fc1 -> ReLU).

    y = fq.int8_linear(xq, wq, scale, bias, dtype); z = relu(y)   ->   z = fq.int8_linear(..., act="relu")

Our GEMMs are opaque to Inductor, so it cannot fuse the ReLU into them: without this pass the GEMM
writes its output, a ReLU kernel reads it and writes it again.  The epilogue applies the ReLU to the
float32 value before the final cast (the same values: rounding is monotone and keeps 0).

Skipped where the ReLU's output only feeds fused activation quantizes (`fq.flatten_quantize_fused`):
Inductor already fuses the ReLU into that kernel for free, and the ReLU epilogue would cost an extra
CUTLASS instance to build on first use.
"""

from __future__ import annotations

import torch
import torch.fx as fx

_GEMMS = (torch.ops.fq.int8_linear.default, torch.ops.fq.int4_linear.default)
_RELU_FUNCS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.ops.aten.relu.default}


def _relu_input(n: fx.Node):
    """The input of a ReLU node (in place or not: the GEMM output it reads has no other user), else None."""
    if (n.op == "call_method" and n.target in ("relu", "relu_")) or (n.op == "call_function"
                                                                      and n.target in _RELU_FUNCS):
        return n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
    return None


def fuse_relu_epilogues(gm: fx.GraphModule) -> set[fx.Node]:
    """Fold eligible ReLUs into their GEMMs (see the module docstring); returns the GEMM nodes
    that now end in a ReLU."""
    fused_q = (torch.ops.fq.flatten_quantize_fused.default, torch.ops.fq.flatten_quantize_rows_fused.default)
    done = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _GEMMS:
            continue
        users = list(node.users)
        if len(users) != 1 or _relu_input(users[0]) is not node:
            continue
        relu = users[0]
        if relu.users and all(u.op == "call_function" and u.target in fused_q for u in relu.users):
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        node.args = (*args[:5], "relu", *args[6:])      # row_scale (per-token scales) stays where it was
        relu.replace_all_uses_with(node)
        gm.graph.erase_node(relu)
        done.add(node)
    return done
