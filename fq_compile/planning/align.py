"""Block alignment: every decoder block's copy of a group gets the same flattened width K'.

A calibrated plan flattens each layer by its own data, so the same group of two blocks (layer 3's and
layer 4's down_proj input) ends with different K' (the extra channels E_j differ), and regional
compilation (passes/regions.py) can share no compiled body between blocks: the first call compiles every
block.  Padding each group to the largest K' among its copies in the other blocks (zero positions, as the
pad to a multiple of 32 already adds: src 0, lo = hi = 0, weight column 0, inactive) makes the blocks'
programs the same, so one body serves them all.  The values are unchanged (a zero column adds nothing);
the cost is the padded columns' compute and, for decode, their weight bytes: `AlignReport` says how much.

Groups are matched by name with the first layer index replaced ('model.layers.3.mlp.down_proj' and
'model.layers.4.mlp.down_proj' are the same position).  Groups outside the numbered blocks are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fq_compile.plan import ChannelMap, GroupPlan

_INDEX = re.compile(r"\.\d+\.")


def position_of(group_name: str) -> str | None:
    """The group's position in a block ('model.layers.#.mlp.down_proj'); None outside numbered blocks."""
    key, n = _INDEX.subn(".#.", group_name, count=1)
    return key if n else None


def pad_channel_map(cmap: ChannelMap, size: int) -> ChannelMap:
    """`cmap` with zero positions appended up to `size` positions."""
    pad = size - cmap.size
    if pad < 0:
        raise ValueError(f"cannot pad a channel map of {cmap.size} positions to {size}")
    if pad == 0:
        return cmap

    def padded(t, fill):
        return torch.cat([t, torch.full((pad,), fill, dtype=t.dtype)])

    return ChannelMap(padded(cmap.src, 0), padded(cmap.lo, 0.0), padded(cmap.hi, 0.0),
                      padded(cmap.weight_factor, 0.0), padded(cmap.active, False))


@dataclass
class AlignReport:
    """positions: aligned positions (block-local group names) -> their common K'; columns_before/after:
    the summed K' of the aligned groups before and after padding."""
    positions: dict[str, int]
    columns_before: int
    columns_after: int

    @property
    def overhead(self) -> float:
        """Extra flattened columns from alignment, as a fraction of the unaligned columns."""
        return self.columns_after / self.columns_before - 1.0 if self.columns_before else 0.0

    def summary(self) -> str:
        if not self.positions:
            return "block alignment: no repeated groups"
        return (f"block alignment: {len(self.positions)} group positions padded to one K' each "
                f"(+{100 * self.overhead:.1f}% flattened columns)")


def align_groups(groups: dict[str, GroupPlan]) -> AlignReport:
    """Pad every group's channel map (in place) to the largest K' at its position across blocks."""
    by_position: dict[str, list[GroupPlan]] = {}
    for name, g in groups.items():
        pos = position_of(name)
        if pos is not None:
            by_position.setdefault(pos, []).append(g)
    sizes, before, after = {}, 0, 0
    for pos, gs in by_position.items():
        if len(gs) < 2 or len({g.in_features for g in gs}) != 1:
            continue
        size = max(g.flat_features for g in gs)
        sizes[pos] = size
        for g in gs:
            before += g.flat_features
            g.cmap = pad_channel_map(g.cmap, size)
            after += size
    return AlignReport(sizes, before, after)
