"""``hicache``: Hermite-polynomial forecast (HiCache, Feng et al. 2025, arXiv 2508.16984).

``F(i) = D0 + sum_j (s^j / j!) H_j(s x) Delta_j`` with ``x = i - x_0``, physicists' Hermite polynomials
``H_1(y) = 2y``, ``H_2(y) = 4y^2 - 2`` and dual scaling ``s = 0.5`` (the paper's default). The derivative
estimates are ``Delta_j = j! D_j`` from the shared divided differences (our choice, exact derivatives for
polynomial features), so the weight of ``D_j`` is ``s^j H_j(s x)``.
"""

from __future__ import annotations

from recache.mechanisms.base import take
from recache.mechanisms.forecast import DividedDifferences


def hermite(n: int, y):
    """Physicists' Hermite polynomial: ``H_0 = 1, H_1 = 2y, H_{n+1} = 2y H_n - 2n H_{n-1}``."""
    prev, cur = 1.0, 2 * y
    if n == 0:
        return prev
    for k in range(1, n):
        prev, cur = cur, 2 * y * cur - 2 * k * prev
    return cur


class HiCache(DividedDifferences):
    name = "hicache"

    def __init__(self, order: int = 1, scale: float = 0.5):
        super().__init__(order)
        self.scale = scale

    def basis(self, step, rows):
        x = (step - take(self.nodes, rows)[:, 0]).nan_to_num(0.0)
        return [None] + [self.scale ** j * hermite(j, self.scale * x) for j in range(1, self.order + 1)]
