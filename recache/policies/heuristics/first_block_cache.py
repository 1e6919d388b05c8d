"""FirstBlockCache (ParaAttention; diffusers ``FirstBlockCacheConfig``): the first block decides for the rest.

Every step runs block 0, ``r1_i = h1_out - h_in``. If ``L1rel(r1_i, r1_s) < threshold`` (``s`` = the last computed
step) the remaining blocks are skipped and their cached residual is added to ``h1_out``; otherwise they run and
both residuals are refreshed. A skipped step still costs one block (``probe_depth = 1``).
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import RowState, by_rows, row_split, run_blocks
from recache.policies.heuristics.base import OnlineHeuristic, relative_l1


class FirstBlockCache(OnlineHeuristic):
    name = "first-block-cache"
    fill = "first-block + reuse"
    probe_depth = 1
    bracket = (1e-3, 2.0)

    def reset(self, rows, branches, steps):
        super().reset(rows, branches, steps)
        self.first, self.rest = RowState(rows), RowState(rows)

    def __call__(self, step, h, c, blocks):
        h1 = blocks[0](h, c)
        r1 = h1 - h
        if self.first.value is None:
            compute = torch.ones(self.samples, dtype=torch.bool)
        else:
            compute = relative_l1(r1, self.first.read(slice(None)), self.branches) >= self.threshold
        compute = self.per_row(compute)

        def computed(rows):
            out = run_blocks(blocks[1:], h1[rows], c[rows])
            self.first.write(rows, r1[rows])
            self.rest.write(rows, out - h1[rows])
            return out

        return by_rows(row_split(compute), h, computed, lambda rows: h1[rows] + self.rest.read(rows)), compute
