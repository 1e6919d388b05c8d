"""``reuse``: residual of the whole block stack (FORA / TeaCache / BudCache style, step level).

At a computed step ``s`` keep ``r_s = h_out(s) - h_in(s)``; at a cached step ``i`` the embeddings run fresh and
``h_out(i) = h_in(i) + r_s``, then the final adaLN layer runs with the current ``temb(sigma_i)``.
"""

from __future__ import annotations

from recache.mechanisms.base import Mechanism, RowState


class Reuse(Mechanism):
    name = "reuse"
    runs_as_hook = True

    def reset(self, rows: int, steps: int) -> None:
        super().reset(rows, steps)
        self.residual = RowState(rows)

    def record(self, step, rows, h_in, h_out):
        self.residual.write(rows, h_out - h_in)

    def cached_pass(self, step, rows, h, c, blocks):
        return h + self.residual.read(rows)
