"""Shared state of the forecasting mechanisms: Newton divided differences of a feature over computed steps.

After computed steps ``x_0 > x_1 > ... `` (newest first) with features ``F``, keep per row the top diagonal of the
divided-difference table ``D_j = F[x_0, ..., x_j]`` for ``j = 0..order``. Adding a step ``t``:
``D'_0 = F_t``, ``D'_{j+1} = (D'_j - D_j) / (t - x_j)``. The Newton polynomial
``F(i) ~ sum_j D_j prod_{l<j} (i - x_l)`` is then exact for features that are polynomials of degree <= order
in the step index, whatever the gaps between computed steps; with fewer than ``order + 1`` computed steps the
missing terms are zero, which falls back to a lower order (and to reuse after a single step).
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import Mechanism, Rows, RowState, take


class DividedDifferences(Mechanism):
    """Base for ``taylorseer`` and ``hicache``: the feature is the block-stack residual ``h_out - h_in``."""

    runs_as_hook = True

    def __init__(self, order: int = 1):
        if order not in (1, 2):
            raise ValueError(f"forecast order must be 1 or 2, got {order!r}")
        self.order = order

    def reset(self, rows: int, steps: int) -> None:
        super().reset(rows, steps)
        self.diffs = [RowState(rows) for _ in range(self.order + 1)]
        self.nodes = torch.full((rows, self.order + 1), float("nan"))
        self.count = torch.zeros(rows, dtype=torch.long)

    def record(self, step: int | torch.Tensor, rows: Rows, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        feature = h_out - h_in
        if self.nodes.device != feature.device:  # state follows the model's device (a GPU pipeline)
            self.nodes, self.count = self.nodes.to(feature.device), self.count.to(feature.device)
        nodes, count = take(self.nodes, rows), take(self.count, rows)
        at = torch.as_tensor(step, dtype=nodes.dtype, device=nodes.device).expand(nodes.shape[0])  # one step per row
        new = [feature]
        for j in range(self.order):
            if self.diffs[j].value is None:
                new.append(torch.zeros_like(feature))
                continue
            gap = (at - nodes[:, j]).nan_to_num(1.0).view(-1, *[1] * (feature.dim() - 1))
            has = (count > j).view_as(gap)
            new.append(torch.where(has, (new[j] - self.diffs[j].read(rows)) / gap, 0.0))
        for state, value in zip(self.diffs, new, strict=True):
            state.write(rows, value)
        self.nodes[rows] = torch.cat([at.unsqueeze(1), nodes[:, :-1]], dim=1)
        self.count[rows] = count + 1

    def basis(self, step: int | torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        """Per-row weight of ``D_j`` at ``step``, shaped to broadcast over the feature; index 0 is always 1."""
        raise NotImplementedError

    def cached_pass(self, step, rows, h, c, blocks):
        weights = self.basis(step, rows)
        out = h + self.diffs[0].read(rows)
        for j in range(1, self.order + 1):
            out = torch.addcmul(out, weights[j].view(-1, *[1] * (h.dim() - 1)).to(h.dtype), self.diffs[j].read(rows))
        return out
