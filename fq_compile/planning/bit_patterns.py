"""Bit-pattern limiting: mixed-bit blocks promoted INT4 -> INT8 so that they fall into a few patterns.

Regional compilation (passes/regions.py) shares one compiled body between decoder blocks that are the
same program.  At O2/O3 Eq. 8 chooses INT4 or INT8 per layer, so two blocks whose INT4 layers differ are
two programs, and each distinct per-block bit pattern is another body to compile (the benchmarks'
synthetic O3 plan of OPT-13B: 8 patterns over 40 blocks; Inductor was 83 s of a 106 s first call on the
H100).  `limit_patterns` bounds the number of patterns by k, changing bits in one direction only:

  * a block's pattern is the set of its layer positions (align.position_of) in INT4 (with its layout,
    the set of all its positions: blocks of different layouts never share a pattern);
  * a layer is only ever promoted from INT4 to INT8, never demoted: accuracy can only improve, and
    the all-INT8 pattern fits every block;
  * an activation group is promoted whole or not at all: in each block, either each of the group's
    layers keeps its bits or all of them become INT8, so a group whose layers agreed (q/k/v all INT4)
    still agrees, and its one activation quantize keeps serving one bit width;
  * among all ways to pick at most k patterns (the all-INT8 one counts towards k when used) and give
    each block the best pattern it fits, the one keeping the most INT4 weight size (sum of the given
    weight sizes of the layers left in INT4) wins.

Search: a block fits a candidate pattern when the pattern keeps some of its groups whole and promotes
the rest, so the candidates are, for every block, its pattern with each subset of its INT4 groups
promoted (at most 2^groups per distinct block).  Candidates that another candidate beats or equals on
every block are dropped; then every set of at most k of the rest is scored (exact), unless there are
more than MAX_SETS such sets, where a greedy choice improved by single swaps until none helps is
taken instead (the report says `exact=False`).  Layers outside the numbered blocks are left alone.
Pure: names, bits, sizes and group names in; new bits and a report out.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from fq_compile.planning.align import block_of, position_of

MAX_SETS = 2_000_000      # candidate sets scored exactly; more: greedy + swaps
_CHUNK = 50_000


@dataclass
class PatternReport:
    """k: the limit (0: off); blocks: blocks considered; patterns_before/after: distinct per-block bit patterns;
    layers / size: count and summed weight size of the layers considered; int4_*_before/after: of those in INT4;
    promoted: layers promoted INT4 -> INT8; exact: the chosen patterns are the best set (else greedy + swaps)."""
    k: int = 0
    blocks: int = 0
    patterns_before: int = 0
    patterns_after: int = 0
    layers: int = 0
    size: int = 0
    int4_layers_before: int = 0
    int4_layers_after: int = 0
    int4_size_before: int = 0
    int4_size_after: int = 0
    promoted: list[str] = field(default_factory=list)
    exact: bool = True

    def share(self, what: str, when: str) -> float:
        """INT4 share of the layers ('layers') or of their weight size ('size'), 'before' or 'after'."""
        total = self.layers if what == "layers" else self.size
        return getattr(self, f"int4_{what}_{when}") / total if total else 0.0

    def summary(self) -> str:
        if not self.k:
            return f"bit patterns: off, {self.patterns_before} over {self.blocks} blocks (no limit)"
        if not self.blocks:
            return "bit patterns: no repeated blocks"
        return (f"bit patterns: {self.patterns_before} -> {self.patterns_after} over {self.blocks} blocks (k={self.k}"
                f"{'' if self.exact else ', greedy'}); INT4 layers {100 * self.share('layers', 'before'):.1f}% -> "
                f"{100 * self.share('layers', 'after'):.1f}%, INT4 weights {100 * self.share('size', 'before'):.1f}% "
                f"-> {100 * self.share('size', 'after'):.1f}%; {len(self.promoted)} layer"
                f"{'s' if len(self.promoted) != 1 else ''} promoted to INT8")


def block_patterns(bits: dict[str, int]) -> dict[int, tuple[frozenset, frozenset]]:
    """block -> (layout: its layer positions, its positions in INT4)."""
    layout: dict[int, set] = {}
    int4: dict[int, set] = {}
    for name, b in bits.items():
        blk = block_of(name)
        if blk is None:
            continue
        layout.setdefault(blk, set()).add(position_of(name))
        if b == 4:
            int4.setdefault(blk, set()).add(position_of(name))
    return {blk: (frozenset(pos), frozenset(int4.get(blk, ()))) for blk, pos in layout.items()}


def count_patterns(bits: dict[str, int]) -> int:
    """Distinct per-block bit patterns of `bits` (layer -> 4 or 8)."""
    return len(set(block_patterns(bits).values()))


def limit_patterns(bits: dict[str, int], size: dict[str, int], group: dict[str, str],
                   k: int) -> tuple[dict[str, int], PatternReport]:
    """New bits with at most k distinct block patterns (see the module docstring) and the report.
    bits: layer -> 4 or 8 (other values are left alone and count as not INT4); size: layer -> its
    weight size (e.g. N x K); group: layer -> the name of the activation group it reads; k: the limit
    (0: off, bits returned unchanged)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the pattern limit k must be an integer >= 0, got {k!r}")
    new = dict(bits)
    in_blocks = [n for n in bits if block_of(n) is not None]
    before = block_patterns(bits)
    rep = PatternReport(k=k, blocks=len(before), patterns_before=len(set(before.values())), layers=len(in_blocks),
                        size=sum(size[n] for n in in_blocks))
    rep.int4_layers_before = sum(bits[n] == 4 for n in in_blocks)
    rep.int4_size_before = sum(size[n] for n in in_blocks if bits[n] == 4)
    rep.int4_layers_after, rep.int4_size_after, rep.patterns_after = (rep.int4_layers_before, rep.int4_size_before,
                                                                      rep.patterns_before)
    if k == 0 or rep.patterns_before <= k:
        return new, rep

    blocks = sorted(before)
    names = {blk: {} for blk in blocks}            # block -> position -> layer name
    for n in in_blocks:
        names[block_of(n)][position_of(n)] = n

    def units(blk):
        """The block's INT4 groups, each as the frozenset of its INT4 positions."""
        by_group: dict[str, set] = {}
        for pos in before[blk][1]:
            by_group.setdefault(group[names[blk][pos]], set()).add(pos)
        return [frozenset(v) for _, v in sorted(by_group.items())]

    unit_of = {blk: units(blk) for blk in blocks}
    cands: dict[tuple[frozenset, frozenset], None] = {}
    for blk in blocks:
        us = unit_of[blk]
        for keep in itertools.product((False, True), repeat=len(us)):
            kept = frozenset().union(*(u for u, k_ in zip(us, keep) if k_))
            cands[(before[blk][0], kept)] = None
    cand = list(cands)
    # a block that fits no chosen pattern costs more than all INT4 sizes together: sums stay finite and
    # comparable (the greedy search prefers covering blocks), and a set scoring >= 0 fits every block
    value = np.full((len(blocks), len(cand)), -float(rep.size + 1))
    for i, blk in enumerate(blocks):
        lay, int4 = before[blk]
        us = unit_of[blk]
        for j, (c_lay, c4) in enumerate(cand):
            if c_lay != lay or not c4 <= int4 or any(c4 & u and not u <= c4 for u in us):
                continue
            value[i, j] = sum(size[names[blk][p]] for p in c4)
    cand_idx = _undominated(value)
    chosen, rep.exact = _best_set(value[:, cand_idx], k)
    chosen = [cand_idx[c] for c in chosen]
    for i, blk in enumerate(blocks):
        j = max(chosen, key=lambda c: value[i, c])
        keep4 = cand[j][1]
        for pos in before[blk][1] - keep4:
            new[names[blk][pos]] = 8
            rep.promoted.append(names[blk][pos])
    rep.promoted.sort()
    rep.patterns_after = count_patterns(new)
    rep.int4_layers_after = sum(new[n] == 4 for n in in_blocks)
    rep.int4_size_after = sum(size[n] for n in in_blocks if new[n] == 4)
    return new, rep


def _undominated(value: np.ndarray) -> list[int]:
    """Columns (candidates) that no other column matches or beats on every row (of equal columns, the first)."""
    keep = []
    n = value.shape[1]
    for j in range(n):
        col = value[:, j:j + 1]
        geq = (value >= col).all(axis=0)
        gt = (value > col).any(axis=0)
        geq[j] = False
        if not (geq & (gt | (np.arange(n) < j))).any():
            keep.append(j)
    return keep


def _score(value: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Total value of each candidate set (rows of `sets`): each block takes its best member (negative when a
    block fits none)."""
    return value[:, sets].max(axis=2).sum(axis=0)


def _best_set(value: np.ndarray, k: int) -> tuple[list[int], bool]:
    """The set of at most k columns with the highest score (ties: fewer columns, then the first found),
    and whether it is exact.  Scores are finite (see limit_patterns)."""
    n = value.shape[1]
    k = min(k, n)
    total_sets = sum(math.comb(n, r) for r in range(1, k + 1))
    if total_sets <= MAX_SETS:
        best, best_set = -np.inf, None
        for r in range(1, k + 1):
            it = itertools.combinations(range(n), r)
            while True:
                chunk = np.array(list(itertools.islice(it, _CHUNK)), dtype=np.int64)
                if not chunk.size:
                    break
                scores = _score(value, chunk)
                i = int(np.argmax(scores))
                if scores[i] > best:
                    best, best_set = scores[i], chunk[i].tolist()
        if best < 0:
            raise ValueError(f"no {k} patterns fit every block (blocks of more than {k} layouts)")
        return best_set, True
    chosen: list[int] = []
    for _ in range(k):                               # greedy: add the column that helps most
        scores = [(_score(value, np.array([chosen + [j]]))[0], j) for j in range(n) if j not in chosen]
        chosen.append(max(scores)[1])
    improved = True
    while improved:                                  # then swap single columns while that helps
        improved = False
        current = _score(value, np.array([chosen]))[0]
        for a in range(len(chosen)):
            for j in range(n):
                if j in chosen:
                    continue
                trial = chosen[:a] + [j] + chosen[a + 1:]
                s = _score(value, np.array([trial]))[0]
                if s > current:
                    chosen, current, improved = trial, s, True
    if _score(value, np.array([chosen]))[0] < 0:
        raise ValueError(f"no {k} patterns fit every block (blocks of more than {k} layouts)")
    return chosen, False
