"""A rank's part of a plan (runtime/tensor_parallel.py), checked on the integers: the ranks' shards
of a row-parallel layer add up to the single-process accumulator exactly, those of a column-parallel
layer are its rows bit for bit.  (Whole models over 2 processes: tests/test_tensor_parallel.py.)"""

import dataclasses

import pytest
import torch

from fq_compile.kernels import flatten_quantize_reference, int_matmul_reference, pack_int4, unpack_int4
from fq_compile.kernels.flatten_quantize import QMAX
from fq_compile.kernels.int_gemm import quant_linear_reference
from fq_compile.passes.lower import op_constants
from fq_compile.plan import GroupPlan, LayerPlan, PlanMismatchError
from fq_compile.planning.flatten import channel_map
from fq_compile.runtime.tensor_parallel import LayerShard, bias_once, shard_channel_map, shard_group, shard_layer

C, N, PAD = 70, 24, 32


def _group(seed: int) -> GroupPlan:
    """Random flatten counts (some channels with several extra slices, others with weight splits)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(C, generator=g)
    extra = torch.zeros(C, dtype=torch.int64)
    dup = torch.zeros(C, dtype=torch.int64)
    extra[order[:9]] = torch.randint(1, 6, (9,), generator=g)
    dup[order[9:14]] = torch.randint(1, 3, (5,), generator=g)
    smooth = torch.rand(C, generator=g) + 0.5
    return GroupPlan(name="g", layers=["l"], in_features=C, threshold=2.0, smooth=smooth, fold="op", extra=extra,
                     weight_dup=dup, act_max=(extra + 1) * 2.0 * smooth, pad_multiple=PAD,
                     cmap=channel_map(extra, dup, PAD))


def _layer(g: GroupPlan, bits: int, seed: int) -> LayerPlan:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-QMAX[bits], QMAX[bits] + 1, (N, g.flat_features), generator=gen).to(torch.int8)
    q[:, ~g.cmap.active] = 0
    return LayerPlan(name="l", group="g", in_features=C, out_features=N, bits=bits,
                     weight_q=pack_int4(q) if bits == 4 else q, weight_scale=torch.rand(N, generator=gen) * 1e-2 + 1e-3,
                     act_scale=g.threshold / QMAX[bits], bias=torch.randn(N, generator=gen), fingerprint=1.0)


def _input(seed: int, g: GroupPlan) -> torch.Tensor:
    """Activations spanning the flattened range (outlier channels up to their calibrated max)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(6, C, generator=gen) * 2 - 1) * g.act_max * 1.1


def _quantize(x, g, bits):
    c = op_constants(g, bits, smooth_in_op=True)
    return flatten_quantize_reference(x, c["src"], c["mult"], c["lo"], c["hi"], bits)


def _acc(xq, lp):
    a, w = (unpack_int4(xq), unpack_int4(lp.weight_q)) if lp.bits == 4 else (xq, lp.weight_q)
    return int_matmul_reference(a, w)


def _chunks(n: int, ranks: int):
    """(offset, size) per rank, as DTensor's Shard splits a dimension (torch.chunk)."""
    out, off = [], 0
    for part in torch.arange(n).chunk(ranks):
        out.append((off, part.numel()))
        off += part.numel()
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("ranks", [2, 3])
def test_row_shards_add_up_to_the_single_process_integers(bits, ranks):
    g = _group(seed=ranks + bits)
    lp = _layer(g, bits, seed=1)
    x = _input(2, g)
    full = _acc(_quantize(x, g, bits), lp)
    y_full = quant_linear_reference(_quantize(x, g, bits), lp.weight_q, lp.scale, lp.bias, bits, torch.float32)
    total, y_sum, biased = torch.zeros_like(full), torch.zeros_like(y_full), 0
    for r, (off, size) in enumerate(_chunks(C, ranks)):
        shard = LayerShard(1, off, size, (N, C), r, ranks)
        lpl, gl = shard_layer(lp, g, shard)
        assert torch.equal(lpl.bias, lp.bias)          # every rank's plan keeps the (replicated) bias...
        lpl = bias_once(lpl, shard)                     # ...and its op adds it at coordinate 0 only
        assert gl.flat_features % PAD == 0 and lpl.in_features == size and gl.threshold == g.threshold
        assert torch.equal(lpl.weight_scale, lp.weight_scale)           # per-channel scales are whole
        xq = _quantize(x[:, off:off + size], gl, bits)                  # the rank quantizes its own channels
        total += _acc(xq, lpl)
        y_sum += quant_linear_reference(xq, lpl.weight_q, lpl.scale, lpl.bias, bits, torch.float32)
        biased += lpl.bias is not None
    assert torch.equal(total, full)                                     # integer GEMMs identical, per shard
    assert biased == 1                                                  # the all-reduce adds the bias once
    assert torch.allclose(y_sum, y_full, rtol=1e-6, atol=1e-6 * float(y_full.abs().max()))


def test_row_shard_channel_map_is_built_from_the_ranks_own_channels():
    """The rank's map is what planning/flatten.py builds from its channels' flatten counts alone."""
    g = _group(seed=7)
    for off, size in _chunks(C, 3):
        local = shard_channel_map(g.cmap, off, size, PAD)
        want = channel_map(g.extra[off:off + size], g.weight_dup[off:off + size], PAD)
        for f in dataclasses.fields(want):
            assert torch.equal(getattr(local, f.name), getattr(want, f.name)), f.name
        gl = shard_group(g, off, size)
        assert torch.equal(gl.smooth, g.smooth[off:off + size]) and gl.in_features == size


@pytest.mark.parametrize("bits", [8, 4])
def test_column_shards_are_the_rows_bit_for_bit(bits):
    g = _group(seed=3)
    lp = _layer(g, bits, seed=4)
    xq = _quantize(_input(5, g), g, bits)
    y_full = quant_linear_reference(xq, lp.weight_q, lp.scale, lp.bias, bits, torch.float16)
    parts = []
    for r, (off, size) in enumerate(_chunks(N, 2)):
        lpl, gl = shard_layer(lp, g, LayerShard(0, off, size, (N, C), r, 2))
        assert gl is g and lpl.out_features == size                     # activation constants replicated
        parts.append(quant_linear_reference(xq, lpl.weight_q, lpl.scale, lpl.bias, bits, torch.float16))
    assert torch.equal(torch.cat(parts, dim=-1), y_full)


def test_shard_of_another_shape_is_refused_and_records_round_trip():
    g = _group(seed=0)
    lp = _layer(g, 8, seed=0)
    with pytest.raises(PlanMismatchError, match="weight shape"):
        shard_layer(lp, g, LayerShard(0, 0, 12, (N, C + 2), 0, 2))
    s = LayerShard(1, 35, 35, (N, C), 1, 2)
    assert LayerShard.from_record(s.record()) == s
