"""Where a sampler's state first went non-finite (NaN or inf), per row, at the cost of one reduction per step and
one read at the end (no host sync per step, so GPU sampling is not slowed)."""

from __future__ import annotations

import torch

from recache.errors import NonFiniteError


class FiniteWatch:
    """``update(x, step)`` after each Euler update of rows ``x``; ``check()`` raises ``NonFiniteError`` naming the
    first rows that went non-finite and the sampler step (0-based, of ``T``) whose update made them so."""

    def __init__(self, rows: int, T: int, device: torch.device | str = "cpu"):
        self.T, self.first = T, torch.full((rows,), -1, dtype=torch.long, device=device)

    def update(self, x: torch.Tensor, step: int | torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> None:
        bad = ~torch.isfinite(x.detach().flatten(1)).all(1)
        first = self.first[rows]
        self.first[rows] = torch.where(bad & (first < 0), torch.as_tensor(step, device=first.device), first)

    def check(self, what: str = "sample") -> None:
        bad = (self.first >= 0).nonzero().squeeze(1).tolist()
        if bad:
            steps = self.first[bad].tolist()
            first = min(steps)
            raise NonFiniteError(f"non-finite values (NaN or inf) in {what} row{'s' if len(bad) > 1 else ''} {bad[:8]}"
                                 f"{' ...' if len(bad) > 8 else ''}, first at sampler step {first} of {self.T} "
                                 f"(row {bad[steps.index(first)]})")
