"""What a caching mechanism is: per-row state filled at computed steps and used at cached steps.

The model is seen through the adapter protocol (``embed(x) -> h``, ``condition(sigma, cond) -> c``,
``blocks``, ``final(h, c)``). Rows are batch rows, so each CFG branch and each rollout of a batched call has its own
state. ``rows`` is an index tensor, or ``slice(None)`` when every row takes the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch

Rows = torch.Tensor | slice


class TransformerBlock(Protocol):
    def __call__(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor: ...


class CacheableModel(Protocol):
    """A diffusion transformer seen as embedding -> blocks -> final layer, conditioned per step by ``c``.

    ``condition`` broadcasts the shape of ``sigma`` against that of ``cond``: with a (T, 1) grid it returns the
    conditioning of every step at once, which cached sampling computes once per call (a cached step then costs
    only the embedding, the mechanism and the final layer)."""

    blocks: Sequence[TransformerBlock]

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def condition(self, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...

    def final(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor: ...


def run_blocks(blocks: Sequence[TransformerBlock], h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h, c)
    return h


class Mechanism:
    """Base class. Subclasses implement ``record`` (after a full pass) and ``cached_pass``."""

    name: ClassVar[str]
    reuses_output: ClassVar[bool] = False  # True only for step-skip: it reuses the model output itself

    def reset(self, rows: int, steps: int) -> None:
        """Drop all state before a sampling call with ``rows`` batch rows and ``steps`` steps."""
        self.rows, self.total_steps = rows, steps

    def full_pass(self, step: int | torch.Tensor, rows: Rows, h: torch.Tensor, c: torch.Tensor, blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """Run every block on these rows and record what the mechanism keeps. ``step`` is the rows' step, or a tensor
        of one step per row when rows run on their own clocks (batched rollouts); the same holds for every method."""
        h_out = run_blocks(blocks, h, c)
        self.record(step, rows, h, h_out)
        return h_out

    def record(self, step: int | torch.Tensor, rows: Rows, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        raise NotImplementedError

    def cached_pass(self, step: int | torch.Tensor, rows: Rows, h: torch.Tensor, c: torch.Tensor, blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """The block stack's output for rows that do not compute at ``step``."""
        raise NotImplementedError


Split = bool | tuple[torch.Tensor, torch.Tensor]


def row_split(compute: torch.Tensor) -> Split:
    """How a step's rows divide: ``True`` (all compute), ``False`` (none), or (computing rows, the others) as index
    tensors. A fixed schedule's splits are found once per sampling call, an online heuristic's at each step."""
    if bool(compute.all()):
        return True
    if not bool(compute.any()):
        return False
    return compute.nonzero().squeeze(1), (~compute).nonzero().squeeze(1)


def by_rows(split: Split, like: torch.Tensor, full, cached) -> torch.Tensor:
    """Stitch ``full(rows)`` for the computing rows of ``split`` and ``cached(rows)`` for the others into one tensor
    shaped like ``like``; when all rows take one path it is called once with ``slice(None)``."""
    if split is True:
        return full(slice(None))
    if split is False:
        return cached(slice(None))
    idx, rest = split
    out = torch.empty_like(like)
    out[idx] = full(idx)
    out[rest] = cached(rest)
    return out


def blocks_or_cache(mechanism: Mechanism, step: int, split: Split, h: torch.Tensor, c: torch.Tensor,
                    blocks: Sequence[TransformerBlock]) -> torch.Tensor:
    """The block stack's output: rows that compute run the blocks together, the others are filled by ``mechanism``."""
    return by_rows(split, h, lambda rows: mechanism.full_pass(step, rows, h[rows], c[rows], blocks),
                   lambda rows: mechanism.cached_pass(step, rows, h[rows], c[rows], blocks))


class RowState:
    """A lazily allocated per-row tensor ``(rows, *shape)`` written and read through row indices."""

    def __init__(self, rows: int):
        self.rows, self.value = rows, None

    def write(self, rows: Rows, value: torch.Tensor) -> None:
        """Store ``value`` for these rows, detached: gradients never flow back into the step that produced it."""
        if self.value is None:
            self.value = value.new_zeros((self.rows, *value.shape[1:]))
        self.value[rows] = value.detach()

    def read(self, rows: Rows) -> torch.Tensor:
        return self.value[rows]
