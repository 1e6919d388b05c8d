"""ReCache v2's learning rule: expert iteration (Anthony et al. 2017) with BudCache's relocation moves as the expert.

The policy (``NoiseLevelPolicy``) is trained on a mixture of settings ``(T, grid shift)`` and every budget of each.
For every (setting, budget) the run keeps its *elite*: the best schedule found so far and its loss ``L(S)``, the
MSE of the final output to the uncached one over the calibration pairs (BudCache's objective, ``rollout_objective``).
One round:

1. take the next ``budgets_per_round`` (setting, budget) keys of a shuffled cycle (a key once per 10 steps of T);
2. propose, for each, the policy's greedy schedule, ``samples`` schedules drawn from it (Gumbel-top-k), the elites
   of the neighbouring budgets with one step less or more, the elites of the same budget on the other settings
   placed on this grid by noise level (``transfers``), and relocations of the elite (one computed step moved by
   up to ``window`` steps, or anywhere with probability 0.2: BudCache's moves; two steps once one is not enough)
   until ``samples + neighbours`` schedules not scored before;
3. score them all in batched rollouts, per setting (every schedule once, as BudCache's memo), and keep any that
   beats its elite; with ``screen_pairs``, score them on those pairs first and only the best ``promote`` of each
   budget on the others;
4. distil: ``distil_steps`` Adam steps on ``-mean (log p(elite) / (k - 1))`` over every elite of every setting.

Elites start as the best of a few power-spaced schedules (``power_steps``). The policy is then where the elites
of all budgets and grids meet: its samples carry what one budget found to its neighbours (a schedule good at k = 6
proposes one for k = 5), and the local moves improve on them. A final distillation of ``final_steps`` makes the
greedy schedules reproduce the elites. Ours throughout; the reference
REINFORCE trainer (``reinforce.py``) stays as it was. Deterministic for a seed: every draw comes from one generator.
"""

from __future__ import annotations

from collections import ChainMap, Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recache.errors import RecacheError
from recache.policies.noise_level import NoiseLevelPolicy
from recache.schedule import Schedule, spread_steps, steps_at_noise_levels

Steps = tuple[int, ...]
Key = tuple[int, int]  # (setting index, budget)


# Defaults by mechanism (ours, measured: docs/recache.md). delta's cached steps run half the blocks, so its rollouts
# cost 2.8 times taylorseer's: fewer rounds keep its training under 10 minutes. Its transfers trapped the large
# budgets of T = 50 on the linear grid (guard ratio to uniform 0.59 and 0.71 at k = 20 and 25 after 60 rounds with
# them, 0.37 and 0.51 without), so delta searches without them.
ROUNDS = {"default": 90, "delta": 60}
TRANSFERS = {"default": True, "delta": False}


@dataclass(frozen=True)
class ExpertConfig:
    """Every setting of a v2 training run (all ours)."""

    mechanism: str = "taylorseer"
    steps: tuple[int, ...] = (20, 30, 50)  # the trained step counts ...
    shifts: tuple[float, ...] = (1.0, 3.0)  # ... times the trained grid shifts (1 = linear)
    k_fraction: tuple[float, float] = (0.08, 0.5)
    rounds: int | None = None  # None: ``ROUNDS`` (fewer for a mechanism whose rollouts cost more)
    budgets_per_round: int = 8
    samples: int = 6
    neighbours: int = 10
    transfers: bool | None = None  # also propose the other settings' elites of the same k, placed by noise level
    # (None: ``TRANSFERS``)
    window: int = 3
    pairs: int = 8  # calibration pairs of the objective, seeds 0..pairs-1
    screen_pairs: int = 4  # > 0: proposals are first scored on this many of those pairs (0: off) ...
    promote: int = 4  # ... and the best ``promote`` of each budget on the others
    distil_steps: int = 20
    final_steps: int = 600
    lr: float = 3e-3
    hidden: int = 128
    seed: int = 0

    def __post_init__(self):
        for name, defaults in (("rounds", ROUNDS), ("transfers", TRANSFERS)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults.get(self.mechanism, defaults["default"]))
        for name in ("rounds", "budgets_per_round", "pairs", "final_steps", "hidden"):
            if getattr(self, name) < 1:
                raise RecacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples < 0 or self.neighbours < 0 or self.samples + self.neighbours == 0 or self.window < 1:
            raise RecacheError(f"need proposals: samples={self.samples}, neighbours={self.neighbours} (>= 0, not "
                               f"both 0), window={self.window} (>= 1)")
        if not (0 <= self.screen_pairs < self.pairs and self.promote >= 1):
            raise RecacheError(f"screen_pairs must be from 0 (off) to pairs - 1 = {self.pairs - 1} and promote >= 1, "
                               f"got {self.screen_pairs} and {self.promote}")
        if not (self.steps and all(isinstance(T, int) and 4 <= T <= 1000 for T in self.steps)):
            raise RecacheError(f"trained step counts must be whole numbers from 4 to 1000, got {list(self.steps)}")
        if not (self.shifts and all(0 < s <= 100 for s in self.shifts)):
            raise RecacheError(f"trained grid shifts must be in (0, 100], got {list(self.shifts)}")
        if not 0 < self.k_fraction[0] <= self.k_fraction[1] < 1:
            raise RecacheError(f"k_fraction must satisfy 0 < low <= high < 1, got {list(self.k_fraction)}")
        if not 0 < self.lr <= 1:
            raise RecacheError(f"lr must be in (0, 1], got {self.lr}")


WARM_POWERS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def power_steps(T: int, k: int, power: float) -> Steps:
    """``k`` distinct steps ``round((T - 1) (j / (k - 1))^power)``, ``j = 0..k-1``, pushed apart where they collide:
    uniform at ``power = 1``, denser early above 1, denser late below. The warm start of every elite is the best of
    ``WARM_POWERS`` (ours: good schedules at larger k compute the first steps densely, which single relocations
    from uniform reach slowly)."""
    if k == 1:
        return (0,)
    return tuple(spread_steps([round((T - 1) * (j / (k - 1)) ** power) for j in range(k)], T))


def relocations(steps: Steps, T: int, n: int, window: int, generator: torch.Generator, moves: int = 1) -> list[Steps]:
    """Up to ``n`` distinct schedules that move ``moves`` computed steps (never step 0) one after the other, each by
    1..window or anywhere (one move in five): BudCache's neighbourhood, drawn at random (``moves = 2``: BudCache's
    double move)."""
    out = {}
    for _ in range(4 * n):
        moved = steps
        for _ in range(moves):
            moved = _relocated(moved, T, window, generator)
        if moved != steps:
            out[moved] = None
        if len(out) == n:
            break
    return list(out)


def _relocated(steps: Steps, T: int, window: int, generator: torch.Generator) -> Steps:
    """``steps`` with one computed step moved, or as they were when the draw lands on a computed step or outside."""
    movable = [s for s in steps if s > 0]
    draw = torch.randint(1 << 30, (3,), generator=generator).tolist()
    src = movable[draw[0] % len(movable)]
    offset = draw[1] % (2 * window) - window
    dst = src + offset + (offset >= 0) if draw[2] % 5 else 1 + draw[1] % (T - 1)
    return tuple(sorted({*steps, dst} - {src})) if 0 < dst < T and dst not in steps else steps


def proposals(policy: NoiseLevelPolicy, grids: list[torch.Tensor], k: int, elites: dict, setting: int, seen,
              config: ExpertConfig, generator: torch.Generator) -> list[Steps]:
    """What a round scores for one budget, none of it scored before (``seen``): the greedy schedule, policy samples,
    the elite of budget ``k + 1`` less one step and that of ``k - 1`` with one more (what one budget found, offered to
    its neighbours), the other settings' elites of budget k placed by noise level (``transferred``), then relocations
    of the elite, up to ``samples + neighbours`` new schedules."""
    sigmas = grids[setting]
    T, elite = len(sigmas) - 1, elites[setting, k][1]
    with torch.no_grad():
        masks = policy.sample(torch.full((config.samples,), k), sigmas, generator)
        greedy = policy.logits(torch.tensor([k]), sigmas)[0].topk(k - 1).indices + 1
    drawn = [(0, *sorted(greedy.tolist()))] + [tuple(m.nonzero().squeeze(1).tolist()) for m in masks]
    drawn += _one_removed(elites.get((setting, k + 1)), generator) + _one_added(elites.get((setting, k - 1)), T,
                                                                             generator)
    drawn += transferred(grids, k, elites, setting) if config.transfers else []
    wanted = config.samples + config.neighbours
    fresh = [s for s in dict.fromkeys(drawn) if s not in seen][:wanted]
    for moves in (1, 2, 2):  # a small k near its optimum has few unseen single moves left: then move two steps
        if len(fresh) < wanted:
            more = relocations(elite, T, wanted - len(fresh), config.window, generator, moves)
            fresh += [s for s in more if s not in seen and s not in fresh]
    return fresh[:wanted]


def transferred(grids: list[torch.Tensor], k: int, elites: dict, setting: int) -> list[Steps]:
    """The elites of budget ``k`` of every other setting, each moved onto this setting's grid by the noise levels of
    its computed steps (``steps_at_noise_levels``; ours: good schedules of different grids and T compute at nearly
    the same noise levels, so what one setting found is a good start for another)."""
    return [tuple(steps_at_noise_levels(grids[other][list(elites[other, k][1])], grids[setting]))
            for other in range(len(grids)) if other != setting and (other, k) in elites]


def _one_removed(elite: tuple | None, generator: torch.Generator, n: int = 2) -> list[Steps]:
    if elite is None:
        return []
    steps = elite[1]
    picks = torch.randperm(len(steps) - 1, generator=generator)[:n] + 1
    return [tuple(s for i, s in enumerate(steps) if i != int(p)) for p in picks]


def _one_added(elite: tuple | None, T: int, generator: torch.Generator, n: int = 2) -> list[Steps]:
    if elite is None:
        return []
    free = [u for u in range(1, T) if u not in elite[1]]
    picks = torch.randperm(len(free), generator=generator)[:n]
    return [tuple(sorted((*elite[1], free[int(p)]))) for p in picks]


@dataclass(frozen=True)
class SplitObjective:
    """BudCache's objective on all the calibration pairs as the sum of two parts: ``head`` on the first ``share`` of
    them (what screening scores) and ``tail`` on the rest, each a mean over its pairs."""

    head: Callable[[list[Steps]], list[float]]
    tail: Callable[[list[Steps]], list[float]]
    share: float

    def __call__(self, candidates: list[Steps]) -> list[float]:
        return self.complete(candidates, self.head(candidates))

    def complete(self, candidates: list[Steps], head: list[float]) -> list[float]:
        """The losses on all pairs of ``candidates`` whose ``head`` losses are known."""
        return [self.share * a + (1 - self.share) * b for a, b in zip(head, self.tail(candidates), strict=True)]


def improve(policy: NoiseLevelPolicy, grids: list[torch.Tensor], objectives: list, elites: dict[Key, tuple],
            memo: list[dict], screened: list[dict], keys: list[Key], config: ExpertConfig,
            generator: torch.Generator) -> tuple[int, int]:
    """Steps 2-3 of a round for ``keys``: propose, score per setting (each schedule once: ``memo[setting]`` keeps
    every loss), keep what beats an elite. With ``screen_pairs`` (ours: successive halving in one step), every
    proposal is scored on those pairs first (``screened[setting]``) and only the best ``promote`` of each budget on
    the rest. Returns how many elites improved and how many schedules were scored on all pairs."""
    by_setting: dict[int, list[tuple[int, Steps]]] = {}
    for setting, k in keys:
        seen = ChainMap(memo[setting], screened[setting])
        for steps in proposals(policy, grids, k, elites, setting, seen, config, generator):
            by_setting.setdefault(setting, []).append((k, steps))
    improved = scored = 0
    for setting, items in by_setting.items():
        objective, candidates = objectives[setting], [steps for _, steps in items]
        if config.screen_pairs:
            head = objective.head(candidates)
            screened[setting].update(zip(candidates, head, strict=True))
            items = [items[i] for i in best_per_budget(items, head, config.promote)]
            losses = objective.complete([steps for _, steps in items], [screened[setting][s] for _, s in items])
        else:
            losses = objective(candidates)
        for (k, steps), loss in zip(items, losses, strict=True):
            memo[setting][steps] = loss
            scored += 1
            if loss < elites[setting, k][0]:
                elites[setting, k], improved = (loss, steps), improved + 1
    return improved, scored


def best_per_budget(items: list[tuple[int, Steps]], losses: list[float], n: int) -> list[int]:
    """The indices of the ``n`` lowest ``losses`` of each budget, in their order in ``items``."""
    taken, chosen = Counter(), []
    for i in sorted(range(len(items)), key=lambda i: losses[i]):
        taken[items[i][0]] += 1
        chosen += [i] if taken[items[i][0]] <= n else []
    return sorted(chosen)


def distil(policy: NoiseLevelPolicy, optimizer: torch.optim.Optimizer, grids: list[torch.Tensor],
           elites: dict[Key, tuple], steps: int) -> float:
    """``steps`` Adam steps on the elites' mean negative log-likelihood per placed step; returns the last loss."""
    targets = [(grids[s], torch.stack([Schedule.from_steps(len(grids[s]) - 1, e[1]).as_tensor()
                                       for (t, _), e in elites.items() if t == s])) for s in range(len(grids))]
    loss = torch.zeros(())
    for _ in range(steps):
        loss = sum(-(policy.log_likelihood(masks, sigmas) / (masks.sum(1) - 1)).sum() for sigmas, masks in targets)
        loss = loss / len(elites)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())
