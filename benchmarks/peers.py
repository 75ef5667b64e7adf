"""What users pick instead, as fake-quant module swaps for CPU accuracy tables (issue 11).

    torchao-style int8-dynamic   (torchao Int8DynamicActivationInt8WeightConfig's numerics): INT8
                                 weights per output channel (max / 127), INT8 activations per token,
                                 dynamic (each row's max / 127), symmetric
    torchao-style float8-rowwise (torchao Float8DynamicActivationFloat8WeightConfig(PerRow())'s
                                 numerics): e4m3 weights per output channel (max / 448), e4m3
                                 activations per token, dynamic (each row's max / 448)

FAKE QUANT, labelled as such wherever a figure is reported: the values are quantized and
dequantized in float32 and multiplied by the float GEMM, which is what these recipes compute up to
the accumulation order of their kernels; nothing here is torchao's code or speed (torchao's real
kernels need CUDA: benchmarks/e2e.py runs them on the device).  Every nn.Linear but the skipped ones
(the output head, as for our levels) is swapped.
"""

from __future__ import annotations

import copy

import torch

E4M3_MAX = 448.0
PEERS = {
    "int8-dynamic": "torchao-style int8-dynamic (fake-quant: W8 per channel, A8 per token dynamic)",
    "float8-rowwise": "torchao-style float8-rowwise (fake-quant: e4m3 W per channel, A per token dynamic)",
}


def _int8(t: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 per row (last dim), dequantized."""
    s = (t.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(t / s).clamp(-127, 127) * s


def _float8(t: torch.Tensor) -> torch.Tensor:
    """e4m3 per row (last dim), scale max / 448, dequantized."""
    s = (t.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)
    return (t / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(t.dtype) * s


class FakeQuantLinear(torch.nn.Module):
    """y = Q_act(x) @ Q_w(W).T + b, the weight quantized once, activations per call."""

    def __init__(self, linear: torch.nn.Linear, kind: str):
        super().__init__()
        q = _int8 if kind == "int8-dynamic" else _float8
        self.quantize = q
        with torch.no_grad():
            self.weight = torch.nn.Parameter(q(linear.weight.detach().float()).to(linear.weight.dtype),
                                             requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        xq = self.quantize(x.float()).to(x.dtype)
        return torch.nn.functional.linear(xq, self.weight, self.bias)


def fake_quant_copy(model: torch.nn.Module, kind: str, skip=("lm_head",)) -> torch.nn.Module:
    """A deep copy of `model` with every nn.Linear (but `skip` name matches) swapped for `kind`."""
    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}; one of {', '.join(PEERS)}")
    out = copy.deepcopy(model)
    targets = [n for n, m in out.named_modules() if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)]
    for name in targets:
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, child, FakeQuantLinear(getattr(holder, child), kind))
    return out
