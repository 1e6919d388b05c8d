"""``step-skip`` (baseline): reuse the model output of the last computed step.

Under Euler this equals Euler on the computed steps only (methods: reusing the output is timestep selection,
not caching), so it is the honest floor for any schedule.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import Mechanism, Rows, RowState


class StepSkip(Mechanism):
    name = "step-skip"
    reuses_output = True

    def reset(self, rows: int, steps: int) -> None:
        super().reset(rows, steps)
        self.output = RowState(rows)

    def record_output(self, rows: Rows, v: torch.Tensor) -> None:
        self.output.write(rows, v)

    def cached_output(self, rows: Rows) -> torch.Tensor:
        return self.output.read(rows)
