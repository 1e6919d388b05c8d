"""``taylorseer``: forecast features from finite differences (TaylorSeer, Liu et al. 2025, arXiv 2503.06923).

The feature is the block-stack residual (as cache-dit's TaylorSeer calibrator does), forecast at a cached step
``i`` by the Newton form ``D_0 + D_1 (i - x_0) + D_2 (i - x_0)(i - x_1)``. Unlike the reference code's Taylor
series of backward differences divided by the last gap, this is exact on polynomial features of its order for
uneven gaps (our choice; the two agree at order 1).
"""

from __future__ import annotations

from recache.mechanisms.base import take
from recache.mechanisms.forecast import DividedDifferences


class TaylorSeer(DividedDifferences):
    name = "taylorseer"

    def basis(self, step, rows):
        nodes = take(self.nodes, rows)
        weights, prod = [None], 1.0
        for j in range(1, self.order + 1):
            prod = prod * (step - nodes[:, j - 1]).nan_to_num(0.0)
            weights.append(prod)
        return weights
