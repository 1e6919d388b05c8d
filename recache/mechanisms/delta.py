"""``delta``: Delta-DiT's stage-adaptive reuse of the deviation of a block range (Chen et al. 2024, arXiv 2406.01125).

The stack is split into a front and a rear half. At a computed step both deviations (range output - range
input) are kept. At a cached step in the early stage (``step < boundary``) the front blocks run and the rear
deviation is added to their output; in the late stage the front deviation is added to the fresh input and the
rear blocks run. The split (half the blocks) and ``boundary = T // 2`` are our choice: the paper does not
publish them for these models.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import Mechanism, RowState, by_rows, row_split, run_blocks


class Delta(Mechanism):
    name = "delta"

    def __init__(self, boundary: int | None = None):
        self.boundary = boundary

    def reset(self, rows: int, steps: int) -> None:
        super().reset(rows, steps)
        self.front, self.rear = RowState(rows), RowState(rows)

    def _split(self, blocks) -> int:
        return len(blocks) // 2

    def full_pass(self, step, rows, h, c, blocks):
        mid = run_blocks(blocks[: self._split(blocks)], h, c)
        out = run_blocks(blocks[self._split(blocks):], mid, c)
        self.front.write(rows, mid - h)
        self.rear.write(rows, out - mid)
        return out

    def cached_pass(self, step, rows, h, c, blocks):
        early = torch.as_tensor(step) < (self.boundary if self.boundary is not None else self.total_steps // 2)
        split = row_split(early.expand(h.shape[0]))
        if not isinstance(split, tuple):  # all rows in one stage
            return (self._early if split else self._late)(rows, h, c, blocks)
        ids = torch.arange(self.rows)[rows]  # rows of this mechanism's state
        return by_rows(split, h, lambda r: self._early(ids[r], h[r], c[r], blocks),
                       lambda r: self._late(ids[r], h[r], c[r], blocks))

    def _early(self, rows, h, c, blocks):
        return run_blocks(blocks[: self._split(blocks)], h, c) + self.rear.read(rows)

    def _late(self, rows, h, c, blocks):
        return run_blocks(blocks[self._split(blocks):], h + self.front.read(rows), c)
