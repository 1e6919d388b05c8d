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
Step = int | torch.Tensor  # one step for every row, or one per row (rows on their own clocks)
ALL = slice(None)


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


def distinct_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, inverse)`` when some batch rows are equal in every one of ``tensors``: ``first`` holds one row of
    each distinct kind and ``t[first][inverse]`` equals ``t`` for each tensor; None when every row differs (or the
    tensors do not share their number of rows). Rows are grouped by their sums, then compared element for element, so
    only equal rows are merged. Ours."""
    rows = tensors[0].shape[0]
    if rows < 2 or any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
        return None
    sums = torch.stack([t.reshape(rows, -1).sum(1) for t in tensors], 1).tolist()
    groups, first, inverse = {}, [], []
    for row, key in enumerate(map(tuple, sums)):
        group = groups.get(key)
        if group is not None and all(torch.equal(t[first[group]], t[row]) for t in tensors):
            inverse.append(group)
            continue
        groups.setdefault(key, len(first))
        inverse.append(len(first))
        first.append(row)
    if len(first) == rows:
        return None
    device = tensors[0].device
    return torch.tensor(first, device=device), torch.tensor(inverse, device=device)


def run_blocks(blocks: Sequence[TransformerBlock], h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block stack on ``h`` conditioned by ``c``, each distinct row once (ours): rows with the same input and
    conditioning give the same output, and batched rollouts have many such rows. The schedules of one pair share
    their state until the first step where they differ: the relocations a search or the v2 trainer proposes, the
    segments of a cost table, a REINFORCE group. The other rows take that output, which is what they compute."""
    distinct = distinct_rows(h, c)
    if distinct is not None:
        h, c = h[distinct[0]], c[distinct[0]]
    for block in blocks:
        h = block(h, c)
    return h if distinct is None else h[distinct[1]]


class Mechanism:
    """Base class. Subclasses implement ``record`` (after a full pass) and ``cached_pass``.

    ``step_output`` is the one step dispatch of the package: the embedded sampler, the batched rollouts and the
    online heuristics call it (the heuristics through ``blocks_or_cache``). The diffusers hooks, where the pipeline
    runs the blocks itself, call the same ``record`` and ``cached_pass`` from the first and last block.
    """

    name: ClassVar[str]
    fills_block_stack: ClassVar[bool] = True  # False for step-skip, which reuses the model output itself
    runs_as_hook: ClassVar[bool] = False  # True when a cached step needs only the block stack's input (diffusers hooks)

    def reset(self, rows: int, steps: int) -> None:
        """Drop all state before a sampling call with ``rows`` batch rows and ``steps`` steps; ``full_passes``
        counts, per row, the steps on which the block stack really ran."""
        self.rows, self.total_steps = rows, steps
        self.full_passes = torch.zeros(rows, dtype=torch.long)

    def step_output(self, model: CacheableModel, step: Step, split: Split, x: torch.Tensor, c: torch.Tensor,
                    rows: Rows = ALL) -> torch.Tensor:
        """The model output of one sampler step for the rows of ``x`` (conditioning ``c``): those that compute
        (``split``) run the block stack together, the others are filled by the mechanism; embedding and final layer
        run for every row. ``rows`` maps the rows of ``x`` to this mechanism's state rows (all of them by default)."""
        h = model.embed(x)
        return model.final(self.blocks_or_cache(step, split, h, c, model.blocks, rows), c)

    def blocks_or_cache(self, step: Step, split: Split, h: torch.Tensor, c: torch.Tensor,
                        blocks: Sequence[TransformerBlock], rows: Rows = ALL) -> torch.Tensor:
        """The block stack's output: rows that compute run the blocks (counted in ``full_passes``), the others are
        filled by ``cached_pass``."""

        def full(r):
            self.full_passes[subset(rows, r)] += 1
            return self.full_pass(subset(step, r), subset(rows, r), h[r], c[r], blocks)

        return by_rows(split, h, full, lambda r: self.cached_pass(subset(step, r), subset(rows, r), h[r], c[r], blocks))

    def full_pass(self, step: Step, rows: Rows, h: torch.Tensor, c: torch.Tensor,
                  blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """Run every block on these rows and record what the mechanism keeps. ``step`` is the rows' step, or a tensor
        of one step per row when rows run on their own clocks (batched rollouts); the same holds for every method."""
        h_out = run_blocks(blocks, h, c)
        self.record(step, rows, h, h_out)
        return h_out

    def record(self, step: Step, rows: Rows, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        raise NotImplementedError

    def cached_pass(self, step: Step, rows: Rows, h: torch.Tensor, c: torch.Tensor,
                    blocks: Sequence[TransformerBlock]) -> torch.Tensor:
        """The block stack's output for rows that do not compute at ``step``."""
        raise NotImplementedError


class Uncached(Mechanism):
    """No caching: every step runs the full network. The uncached sampler runs on the same code path as the cached
    ones, so a schedule that computes every step reproduces it bit for bit."""

    name = "none"

    def record(self, step, rows, h_in, h_out):
        pass

    def cached_pass(self, step, rows, h, c, blocks):
        raise RuntimeError("the uncached sampler has no cached steps")


Split = bool | tuple[torch.Tensor, torch.Tensor]


def take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``x[rows]``: a view for a slice, ``index_select`` (the cheaper call) for row indices on ``x``'s device."""
    return x.index_select(0, rows) if isinstance(rows, torch.Tensor) and rows.device == x.device else x[rows]


def subset(per_row: Rows | Step, r: Rows) -> Rows | Step:
    """``per_row`` (state rows or steps, one per row of a call) for the call's rows ``r``; a slice or an int stands
    for every row alike and is passed through."""
    return per_row[r] if isinstance(per_row, torch.Tensor) else (r if isinstance(per_row, slice) else per_row)


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
        return full(ALL)
    if split is False:
        return cached(ALL)
    idx, rest = split
    out = torch.empty_like(like)
    out[idx] = full(idx)
    out[rest] = cached(rest)
    return out


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
        return take(self.value, rows)
