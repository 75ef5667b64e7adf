"""Block alignment: decoder blocks padded to a few common flattened widths K', so they share compiled code.

A calibrated plan flattens each layer by its own data, so the same group of two blocks (layer 3's and
layer 4's down_proj input) ends with different K' (the extra channels E_j differ), and regional
compilation (passes/regions.py) can share no compiled body between blocks: the first call compiles every
block.  Padding groups with zero positions (as the pad to a multiple of 32 already does: src 0,
lo = hi = 0, weight column 0, inactive) changes no value, but every GEMM multiplies the padded columns,
and a decode step reads them.  Padding every block to the widest one is costly where a few blocks
flatten much more than the rest (SmolLM2-135M at beta 3: +11% multiply-adds; benchmarks/align_cost.py),
so the blocks are clustered instead:

    blocks sorted by their multiply-adds per token; cut into k runs of consecutive blocks (dynamic
    programming: least padding for each k); the smallest k whose padding stays within `budget` (a
    fraction of the aligned groups' multiply-adds) wins; each run is padded to its widest group at
    every position.

Blocks of one run are then one program (one compiled body); k runs, k bodies.  Groups are matched by name
with the first layer index replaced ('model.layers.3.mlp.down_proj' and 'model.layers.4.mlp.down_proj'
are the same position); positions that not every block has, and groups outside the numbered blocks,
are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fq_compile.plan import GroupPlan

_INDEX = re.compile(r"\.(\d+)\.")


def position_of(group_name: str) -> str | None:
    """The group's position in a block ('model.layers.#.mlp.down_proj'); None outside numbered blocks."""
    key, n = _INDEX.subn(".#.", group_name, count=1)
    return key if n else None


def block_of(name: str) -> int | None:
    """The block index of a group or layer (its first numbered path component); None outside numbered blocks."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


@dataclass
class AlignReport:
    """blocks: blocks aligned; widths: distinct programs they were padded to (runs); macs_before/after:
    multiply-adds per token of the aligned groups (sum over their layers of N x K') before and after."""
    blocks: int = 0
    widths: int = 0
    macs_before: int = 0
    macs_after: int = 0

    @property
    def overhead(self) -> float:
        """Multiply-adds alignment added, as a fraction of the aligned groups' unaligned ones."""
        return self.macs_after / self.macs_before - 1.0 if self.macs_before else 0.0

    def summary(self) -> str:
        if not self.blocks:
            return "block alignment: no repeated blocks"
        return (f"block alignment: {self.blocks} blocks padded to {self.widths} set{'s' if self.widths != 1 else ''} "
                f"of K' (+{100 * self.overhead:.1f}% multiply-adds in their layers)")


def _runs(costs: list[list[int]], budget: int) -> list[tuple[int, int]]:
    """Cut blocks 0..n-1 (in the order given) into the fewest runs whose summed padding `costs[i][j]`
    (run i..j inclusive) is <= budget; among cuts with that many runs, the least padding."""
    n = len(costs)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n + 1)]    # best[k][j]: first j blocks in k runs
    cut = [[0] * (n + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + costs[i][j - 1]
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
        if best[k][n] <= budget:
            runs, j = [], n
            for kk in range(k, 0, -1):
                runs.append((cut[kk][j], j - 1))
                j = cut[kk][j]
            return runs[::-1]
    return [(i, i) for i in range(n)]


def align_groups(groups: dict[str, GroupPlan], rows: dict[str, int], budget: float) -> AlignReport:
    """Pad the groups' channel maps (in place) as the module docstring says.  rows: a group's output rows
    summed over its layers (N of each GEMM that reads it); budget: the padding allowed, as a fraction
    of the aligned groups' multiply-adds (inf: every block padded to one set of widths)."""
    by_block: dict[int, dict[str, GroupPlan]] = {}
    for name, g in groups.items():
        blk = block_of(name)
        if blk is not None:
            by_block.setdefault(blk, {})[position_of(name)] = g
    if len(by_block) < 2:
        return AlignReport()
    common = set.intersection(*(set(b) for b in by_block.values()))
    common = sorted(p for p in common if len({b[p].in_features for b in by_block.values()}) == 1)
    if not common:
        return AlignReport()
    blocks = list(by_block.values())
    width = [[b[p].flat_features for p in common] for b in blocks]
    n_rows = [rows[blocks[0][p].name] for p in common]
    macs = [sum(w * r for w, r in zip(ws, n_rows)) for ws in width]
    order = sorted(range(len(blocks)), key=lambda i: macs[i])
    costs = [[0] * len(order) for _ in order]
    for i in range(len(order)):
        top = list(width[order[i]])
        total = macs[order[i]]
        for j in range(i, len(order)):
            top = [max(a, b) for a, b in zip(top, width[order[j]])]
            if j > i:
                total += macs[order[j]]
            costs[i][j] = (j - i + 1) * sum(t * r for t, r in zip(top, n_rows)) - total
    before = sum(macs)
    runs = _runs(costs, budget * before)
    after = 0
    for i, j in runs:
        members = [blocks[order[x]] for x in range(i, j + 1)]
        for p_i, p in enumerate(common):
            size = max(b[p].flat_features for b in members)
            for b in members:
                b[p].cmap = b[p].cmap.padded_to(size)
                after += size * n_rows[p_i]
    return AlignReport(len(blocks), len(runs), before, after)
