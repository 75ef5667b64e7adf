"""Plans built without calibration, for speed and memory measurements on random-weight models.

Latency does not depend on weight values, but it does depend on what the backend compiles: the
flattened width K' of every group (its flatten ratio), which layers are INT4, which folds apply.
`synthetic_plan` fixes those from given shares -- e.g. the paper's Table 4 (PAPER_TABLE4, labelled
as such wherever it is used) -- and quantizes the model's own weights on their device, so that the
backend compiles exactly the ops a calibrated plan of those shares would give:

  * structure: the activation groups (q/k/v share one input) and fold sites come from the same
    fold analysis calibration uses, run on a one-block replica of the model (cheap: no calibration
    data, no trace of the whole model), and are repeated for every block;
  * flattening: each group gets round(ratio * C) extra channels -- half of them on a few large
    outlier channels (many slices each), half as one slice on as many moderate channels, which is
    the shape real OPT activations give Eq. 2 -- then the usual channel map (padded to 32);
  * formats (level auto): for each group position, the blocks dealt to the formats in the given
    shares, spread over depth (fp8 / w4a8 layers read the unflattened input); level fp8: all fp8;
  * bits: for each group position in the block (q/k/v, out, fc1, fc2 for OPT), INT4 in the same
    share of blocks, spread evenly over depth (block b is INT4 at a position when (b+1)*share + phase
    passes an integer that b*share + phase did not); so the INT4 share of layers and of weight bytes
    both equal the requested share, and q/k/v never mix bits (one activation quantize per group, as
    calibrated plans mostly give).  The positions are dealt round-robin to m = bits_patterns // 2
    phase classes (phases 0, 1/m, ...): a block's pattern depends only on where frac(b * share) lies
    among the 2m arc ends {1 - share - phase, 1 - phase}, so the blocks take at most 2m <= bits_patterns
    distinct INT4/INT8 patterns, as a calibrated plan under Config.bits_patterns does (the default:
    Config's; bits_patterns=1 puts every block in one pattern, all INT8 or all INT4 positions by the
    nearer share; 0: one phase per position, the plans before Config.bits_patterns, up to 2 x positions
    patterns: OPT's 40 blocks at 45% gave 8);
  * values: smoothing scales 1, threshold T fixed (4.0: random-init activations are ~N(0, 1)),
    weights flattened and rounded at max scales, per tensor or per channel as the level's Config says
    (plain rounding: numerics are not the
    point here).

`release_weights=True` frees each floating-point weight right after its quantized copy exists,
so a model plus its plan never need both copies at once (OPT-30B: 60 GB fp16 + 36 GB INT8 would
not fit an 80 GB GPU); the backend then names those weights from the release registry.

Tensor parallelism: on a model parallelised with ColwiseParallel / RowwiseParallel (DTensor weights,
e.g. built on the meta device, parallelised, then materialised per rank) each rank quantizes only
its own shards and gets its rank-local plan (fq_compile/runtime/tensor_parallel.py): the same
structure and channel maps on every rank, the weight scales taken over all shards (one all-reduce
of maxima per layer), so it equals `shard_plan(synthetic_plan(full model), parallel model)`.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from tqdm.auto import tqdm

from fq_compile.config import BITS_PATTERNS, Config
from fq_compile.kernels.flatten_quantize import QMAX
from fq_compile.kernels.fp8 import E4M3_MAX, round_e4m3
from fq_compile.kernels.packing import pack_int4
from fq_compile.passes.fold import find_fold_site
from fq_compile.passes.match import ParamNames
from fq_compile.passes.observe import find_linears, group_name
from fq_compile.plan import (
    FORMAT_BITS,
    GroupPlan,
    LayerPlan,
    QuantPlan,
    model_hash,
    parameter_shapes,
    weight_fingerprint,
)
from fq_compile.planning.bit_patterns import count_patterns
from fq_compile.planning.calibrate import skipped_layers
from fq_compile.planning.flatten import channel_map, flatten_weight
from fq_compile.runtime.resident import release
from fq_compile.runtime.tensor_parallel import (
    TP_KEY,
    layer_shard,
    local_tensor,
    max_over_shards,
    shard_fingerprint,
    shard_group,
)

# paper Table 4: OPT size -> (share of INT4 layers, average flatten ratio)
PAPER_TABLE4 = {
    "125m": (0.3554, 0.2621), "1.3b": (0.3642, 0.2462), "6.7b": (0.4725, 0.2441),
    "13b": (0.4575, 0.2150), "30b": (0.4829, 0.2242), "66b": (0.4737, 0.2165),
}
SYNTHETIC_THRESHOLD = 4.0
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def _replica(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with one block, on the model's device and dtype."""
    cfg = copy.deepcopy(model.config)
    if not hasattr(cfg, "num_hidden_layers"):
        raise ValueError(f"synthetic_plan needs a Hugging Face decoder config with num_hidden_layers, "
                         f"got {type(cfg).__name__}")
    cfg.num_hidden_layers = 1
    p = next(model.parameters())
    with torch.device(p.device):
        rep = type(model)(cfg)
    return rep.to(p.dtype).eval()


def block_structure(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[list[str], str]]:
    """[(layers of one activation group, encoded fold site)] of block 0 (and of anything outside
    the blocks), found by the fold analysis on a one-block replica's Dynamo graph."""
    rep = _replica(model)
    by_id = {id(p): n for n, p in rep.named_parameters()}
    skip = skipped_layers(rep, skip)
    found: list[tuple[list[str], str]] = []

    def capture(gm, example_inputs):
        name_of = ParamNames(gm, example_inputs, by_id=by_id)
        groups, _ = find_linears(gm, name_of)
        stored_kn = [l.layer for lins in groups.values() for l in lins if l.params is not None and l.params.transposed]
        if stored_kn:
            raise ValueError(f"synthetic_plan supports nn.Linear's weight layout only; {type(model).__name__} stores "
                             f"{stored_kn[0]} transposed (Conv1D): calibrate it with fq_compile.calibrate")
        planned = {l.layer for lins in groups.values() for l in lins if l.layer not in skip}
        for x, lins in groups.items():
            site = find_fold_site(x, {l.node for l in lins}, planned, name_of)
            found.append(([l.layer for l in lins], site.encode()))
        return gm.forward

    ids = torch.zeros(1, 8, dtype=torch.long, device=next(rep.parameters()).device)
    with torch.no_grad():
        torch.compile(rep, backend=capture, dynamic=False)(ids)
    if not found:
        raise ValueError(f"no linear layers found in {type(model).__name__}'s graph")
    return found


def _extra_counts(c: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """E_j summing to `total`: half on a few outlier channels, half as single slices."""
    extra = torch.zeros(c, dtype=torch.int64)
    if total <= 0:
        return extra
    order = torch.randperm(c, generator=gen)
    n_big = max(1, min(8, total // 16))
    big_total = total - min(total // 2, c - n_big)
    extra[order[:n_big]] = big_total // n_big
    extra[order[: big_total % n_big]] += 1
    singles = total - big_total
    extra[order[n_big:n_big + singles]] = 1
    return extra


def _int4_blocks(n_blocks: int, share: float, phase: float) -> set[int]:
    """Blocks whose layer at one group position is INT4: `share` of them, evenly spread."""
    return {b for b in range(n_blocks) if math.floor((b + 1) * share + phase) > math.floor(b * share + phase)}


def _int4_positions(n_blocks: int, share: float, phases: dict[int, float], patterns: int) -> dict[int, set[int]]:
    """position -> its INT4 blocks: `share` of the blocks at every position, in at most `patterns` distinct
    per-block patterns (0: no limit, each position at its own phase in `phases`); see the module docstring."""
    if patterns == 0:
        return {pos: _int4_blocks(n_blocks, share, phase) for pos, phase in phases.items()}
    if patterns == 1:                       # one pattern: the share rounded to all or nothing
        every = set(range(n_blocks)) if share >= 0.5 else set()
        return {pos: every for pos in phases}
    m = patterns // 2
    return {pos: _int4_blocks(n_blocks, share, (k % m) / m) for k, pos in enumerate(sorted(phases))}


def _format_of_block(b: int, n_blocks: int, shares: dict[str, float], phase: float) -> str:
    """The format of block b at one group position: the blocks are dealt to the formats in proportion
    to `shares` (they sum to 1), spread over depth, shifted by the position's phase."""
    u = ((b + 0.5) / n_blocks + phase) % 1.0
    acc = 0.0
    for f, share in shares.items():
        acc += share
        if u < acc:
            return f
    return list(shares)[-1]


def synthetic_plan(model: torch.nn.Module, level: str = "O1", *, flatten_ratio: float = 0.0,
                   int4_share: float = 0.0, format_shares: dict[str, float] | None = None,
                   source: str = "given shares", seed: int = 0, activation_scale: str | None = None,
                   release_weights: bool = False, progress: bool = True,
                   bits_patterns: int | None = None) -> QuantPlan:
    """A plan for `model` at `level` ('w8a8', 'smoothquant', 'O1', 'O2', 'O3', 'fp8' or 'auto') with the
    given average flatten ratio (levels that flatten) and INT4 share of layers (O2/O3); see the module
    docstring.  Level auto takes `format_shares` (format -> share of the layers at every group position,
    e.g. {"fp8": 0.3, "w4a8": 0.5, "int8": 0.2}, what a calibrated auto plan chose); level fp8 puts every
    layer in fp8.  `source` is recorded in plan.calibration (e.g. 'paper Table 4 figures').
    activation_scale: Config.activation_scale ("tensor" or "token"; None: the level's default).
    bits_patterns: at most this many per-block INT4/INT8 patterns (O2/O3; None: Config's default; 0: one
    phase per position, as before the limit existed); recorded as Config.bits_patterns in the plan."""
    config = Config(level=level, activation_scale=activation_scale,
                    bits_patterns=BITS_PATTERNS if bits_patterns is None else bits_patterns)
    _check_shares(config, level, flatten_ratio, int4_share, format_shares)
    params = dict(model.named_parameters())
    skipped = skipped_layers(model, config.skip)
    structure = block_structure(model, config.skip)
    n_blocks = model.config.num_hidden_layers
    groups = _groups_per_block(structure, n_blocks, skipped)
    phases = {pos: k / max(len(structure), 1) for k, pos in enumerate(sorted({g[2] for g in groups}))}
    int4 = _int4_positions(n_blocks, int4_share, phases, config.bits_patterns)

    plan = QuantPlan(config=config, model_type=type(model).__name__, model_hash=model_hash(model), skipped=skipped,
                     calibration={"synthetic": source, "flatten_ratio": flatten_ratio, "int4_share": int4_share,
                                  "format_shares": format_shares},
                     parameters=parameter_shapes(model))
    gen = torch.Generator().manual_seed(seed)
    row_of = {}
    for layers, fold, pos in groups:
        g = _group_plan(layers, fold, params, config, flatten_ratio, gen)
        plan.groups[g.name] = g
        if fold.startswith("rows:"):
            row_of[fold[len("rows:"):]] = g.name
    tp, row_groups = {}, {}
    for (layers, fold, pos) in tqdm(groups, desc="fq_compile: synthetic plan", disable=not progress):
        g = plan.groups[group_name(layers)]
        block = _BLOCK.search(layers[0])
        fmt = _format(level, None if block is None else int(block.group(1)), n_blocks, format_shares, phases[pos],
                      int4[pos])
        for layer in layers:
            w = params[layer + ".weight"]
            b = params.get(layer + ".bias")
            shard = layer_shard(w)                 # tensor parallelism: this rank's shard only
            gl = g
            if shard is not None and shard.dim == 1:
                gl = row_groups.setdefault(g.name, shard_group(g, shard.offset, shard.size))
                plan.groups[g.name] = gl
            plan.layers[layer] = _layer_plan(layer, w, b, g, gl, fmt, shard, config, row_of.get(layer))
            if shard is not None and shard.dim is not None:
                tp[layer] = shard.record()
            if release_weights:
                release(w, layer + ".weight")
                if b is not None:
                    release(b, layer + ".bias")
    if tp:
        plan.calibration[TP_KEY] = tp
    if config.mixed_bits:
        n_pat = count_patterns({n: lp.bits for n, lp in plan.layers.items()})
        plan.calibration["bits_patterns"] = (f"bit patterns: {n_pat} over {n_blocks} blocks (synthetic, "
                                             + (f"at most {config.bits_patterns})" if config.bits_patterns
                                                else "a phase per position)"))
    return plan


def _check_shares(config: Config, level: str, flatten_ratio: float, int4_share: float,
                  format_shares: dict[str, float] | None) -> None:
    """Refuse shares the level cannot take (ValueError naming what is wrong)."""
    if level == "auto":
        if not format_shares or any(f not in FORMAT_BITS for f in format_shares) or \
                abs(sum(format_shares.values()) - 1.0) > 1e-6 or min(format_shares.values()) < 0:
            raise ValueError(f"level 'auto' needs format_shares over {', '.join(FORMAT_BITS)} summing to 1, "
                             f"got {format_shares}")
    elif format_shares:
        raise ValueError(f"format_shares is for level 'auto', not {level!r}")
    if not config.quantize:
        raise ValueError("synthetic_plan makes quantized plans; level 'fp16' needs none")
    if not 0 <= flatten_ratio < 4 or not 0 <= int4_share <= 1:
        raise ValueError(f"flatten_ratio must lie in [0, 4) and int4_share in [0, 1], "
                         f"got {flatten_ratio}, {int4_share}")
    if flatten_ratio and not config.flatten:
        raise ValueError(f"level {level!r} does not flatten; flatten_ratio must be 0")
    if int4_share and not config.mixed_bits:
        raise ValueError(f"level {level!r} is all INT8; int4_share must be 0")


def _groups_per_block(structure, n_blocks: int, skipped) -> list[tuple[list[str], str, int]]:
    """The one-block structure repeated for every block: (layers, fold, position in block) per group,
    block-0 names and fold targets renamed to each block's, skipped layers left out."""
    def per_block(name: str, i: int) -> str:
        return _BLOCK.sub(f".layers.{i}.", name, count=1)

    groups = []
    for pos, (layers, fold) in enumerate(structure):
        in_block = _BLOCK.search(layers[0]) is not None
        for i in range(n_blocks) if in_block else [None]:
            names = [per_block(l, i) if i is not None else l for l in layers]
            kind, _, target = fold.partition(":")
            if kind != "op" and i is not None:
                fold_i = kind + ":" + ",".join(per_block(t, i) for t in target.split(","))
            else:
                fold_i = fold
            names = [n for n in names if n not in skipped]
            if names:
                groups.append((names, fold_i, pos))
    return groups


def _group_plan(layers: list[str], fold: str, params: dict, config: Config, flatten_ratio: float,
                gen: torch.Generator) -> GroupPlan:
    """One activation group: round(ratio * C) extra channels (_extra_counts), smoothing 1, threshold fixed."""
    c = params[layers[0] + ".weight"].shape[1]
    t = SYNTHETIC_THRESHOLD
    extra = _extra_counts(c, round(flatten_ratio * c), gen)
    name = group_name(layers)
    return GroupPlan(
        name=name, layers=layers, in_features=c, threshold=t, smooth=torch.ones(c), fold=fold,
        extra=extra, weight_dup=torch.zeros_like(extra), act_max=((extra + 1) * t).float(),
        pad_multiple=config.pad_multiple, cmap=channel_map(extra, None, config.pad_multiple),
        fold_note="" if fold != "op" else "synthetic plan: as the fold analysis found",
        fold_fingerprints={f: weight_fingerprint(params[f]) for f in fold[len("norm:"):].split(",")}
        if fold.startswith("norm:") else {},
        activation_scale="token" if any(config.token_scaled(layer) for layer in layers) else "tensor")


def _format(level: str, block: int | None, n_blocks: int, format_shares, phase: float, int4_blocks) -> str:
    """The format of a group: auto deals the blocks to format_shares, fp8 is all fp8, O2/O3 put INT4 in
    int4_blocks; layers outside the blocks stay int8."""
    if level == "auto":
        return _format_of_block(block, n_blocks, format_shares, phase) if block is not None else "int8"
    if level == "fp8":
        return "fp8"
    return "int4" if block is not None and block in int4_blocks else "int8"


def _layer_plan(layer: str, w: torch.Tensor, b: torch.Tensor | None, g: GroupPlan, gl: GroupPlan, fmt: str, shard,
                config: Config, rows_folded_from: str | None) -> LayerPlan:
    """The layer's weight flattened by its group's (rank-local: gl) channel map and rounded at max scales,
    per channel or per tensor as config says; the activation scale from the group's threshold."""
    bits = FORMAT_BITS[fmt]
    t = g.threshold
    with torch.no_grad():
        wl = local_tensor(w.detach())
        # smoothing 1: no column or row scaling; e4m3 formats read the unflattened weight
        wf = flatten_weight(wl.float(), gl.cmap) if fmt in ("int8", "int4") else wl.float()
        top = wf.abs().amax(dim=1)
        if config.weight_granularity == "tensor":
            top = top.amax().expand(wf.shape[0])
        if shard is not None and (shard.dim == 1 or config.weight_granularity == "tensor"):
            top = max_over_shards(top, w)
        qmax = E4M3_MAX if fmt == "fp8" else QMAX[bits]
        scale = torch.where(top > 0, top / qmax, torch.ones_like(top)).float()
        if fmt == "fp8":
            q = round_e4m3(wf / scale[:, None])
        else:
            q = torch.round(wf / scale[:, None]).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8)
        del wf
        if fmt not in ("int8", "int4"):
            act_scale = float(g.act_max.max()) / E4M3_MAX
        else:
            act_scale = (1.0 if g.activation_scale == "token" else t) / QMAX[bits]
        return LayerPlan(
            name=layer, group=g.name, in_features=wl.shape[1], out_features=wl.shape[0], bits=bits,
            format=fmt, weight_q=pack_int4(q) if bits == 4 else q, weight_scale=scale, act_scale=act_scale,
            bias=None if b is None else local_tensor(b.detach()).float().clone(),
            fingerprint=shard_fingerprint(w), rows_folded_from=rows_folded_from,
            bias_fingerprint=None if b is None else shard_fingerprint(b))
