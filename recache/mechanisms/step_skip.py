"""``step-skip`` (baseline): reuse the model output of the last computed step.

Under Euler this equals Euler on the computed steps only (methods: reusing the output is timestep selection,
not caching), so it is the honest floor for any schedule. It replaces the whole model output, so it overrides the
step dispatch itself rather than the block stack's part of it.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import (
    ALL,
    CacheableModel,
    Mechanism,
    Rows,
    RowState,
    Split,
    Step,
    by_rows,
    run_blocks,
    subset,
)


class StepSkip(Mechanism):
    name = "step-skip"
    fills_block_stack = False

    def reset(self, rows: int, steps: int) -> None:
        super().reset(rows, steps)
        self.output = RowState(rows)

    def step_output(self, model: CacheableModel, step: Step, split: Split, x: torch.Tensor, c: torch.Tensor,
                    rows: Rows = ALL) -> torch.Tensor:
        """Computing rows run the whole model and keep its output; the others take the output kept last."""

        def computed(r):
            self.full_passes[subset(rows, r)] += 1
            v = model.final(run_blocks(model.blocks, model.embed(x[r]), c[r]), c[r])
            self.output.write(subset(rows, r), v)
            return v

        return by_rows(split, x, computed, lambda r: self.output.read(subset(rows, r)))

    def blocks_or_cache(self, step, split, h, c, blocks, rows=ALL):
        raise RuntimeError("step-skip reuses the model output; it cannot fill the block stack alone")
