"""ReCache v2's learning rule: expert iteration (Anthony et al. 2017) with BudCache's relocation moves as the expert.

The policy (``NoiseLevelPolicy``) is trained on a mixture of settings ``(T, grid shift)`` and every budget of each.
For every (setting, budget) the run keeps its *elite*: the best schedule found so far and its loss ``L(S)``, the
MSE of the final output to the uncached one over the calibration pairs (BudCache's objective, ``rollout_objective``).
One round:

1. take the next ``budgets_per_round`` (setting, budget) keys of a shuffled cycle (a key once per 10 steps of T);
2. propose, for each, the policy's greedy schedule, ``samples`` schedules drawn from it (Gumbel-top-k), the elites
   of the neighbouring budgets with one step less or more, and relocations of the elite (one computed step moved by
   up to ``window`` steps, or anywhere with probability 0.2: BudCache's moves) until ``samples + neighbours``
   schedules not scored before;
3. score them all in batched rollouts, per setting (every schedule once, as BudCache's memo), and keep any that
   beats its elite;
4. distil: ``distil_steps`` Adam steps on ``-mean (log p(elite) / (k - 1))`` over every elite of every setting.

Elites start as the best of a few power-spaced schedules (``power_steps``). The policy is then where the elites
of all budgets and grids meet: its samples carry what one budget found to its neighbours (a schedule good at k = 6
proposes one for k = 5), and the local moves improve on them. A final distillation of ``final_steps`` makes the
greedy schedules reproduce the elites. Ours throughout; the reference
REINFORCE trainer (``reinforce.py``) stays as it was. Deterministic for a seed: every draw comes from one generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recache.errors import RecacheError
from recache.policies.noise_level import NoiseLevelPolicy
from recache.schedule import Schedule, spread_steps

Steps = tuple[int, ...]
Key = tuple[int, int]  # (setting index, budget)


@dataclass(frozen=True)
class ExpertConfig:
    """Every setting of a v2 training run (all ours)."""

    mechanism: str = "taylorseer"
    steps: tuple[int, ...] = (20, 30, 50)  # the trained step counts ...
    shifts: tuple[float, ...] = (1.0, 3.0)  # ... times the trained grid shifts (1 = linear)
    k_fraction: tuple[float, float] = (0.08, 0.5)
    rounds: int = 60
    budgets_per_round: int = 8
    samples: int = 6
    neighbours: int = 10
    window: int = 3
    pairs: int = 8  # calibration pairs of the objective, seeds 0..pairs-1
    distil_steps: int = 20
    final_steps: int = 600
    lr: float = 3e-3
    hidden: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("rounds", "budgets_per_round", "pairs", "final_steps", "hidden"):
            if getattr(self, name) < 1:
                raise RecacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples < 0 or self.neighbours < 0 or self.samples + self.neighbours == 0 or self.window < 1:
            raise RecacheError(f"need proposals: samples={self.samples}, neighbours={self.neighbours} (>= 0, not "
                               f"both 0), window={self.window} (>= 1)")
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


def relocations(steps: Steps, T: int, n: int, window: int, generator: torch.Generator) -> list[Steps]:
    """Up to ``n`` distinct schedules that move one computed step (never step 0) by 1..window, or anywhere (one
    move in five): BudCache's neighbourhood, drawn at random."""
    movable, out = [s for s in steps if s > 0], {}
    for _ in range(4 * n):
        draw = torch.randint(1 << 30, (3,), generator=generator).tolist()
        src = movable[draw[0] % len(movable)]
        offset = draw[1] % (2 * window) - window
        dst = src + offset + (offset >= 0) if draw[2] % 5 else 1 + draw[1] % (T - 1)
        if 0 < dst < T and dst not in steps:
            out[tuple(sorted({*steps, dst} - {src}))] = None
        if len(out) == n:
            break
    return list(out)


def proposals(policy: NoiseLevelPolicy, sigmas: torch.Tensor, k: int, elites: dict, setting: int, seen,
              config: ExpertConfig, generator: torch.Generator) -> list[Steps]:
    """What a round scores for one budget, none of it scored before (``seen``): the greedy schedule, policy samples,
    the elite of budget ``k + 1`` less one step and that of ``k - 1`` with one more (what one budget found, offered to
    its neighbours), then relocations of the elite, up to ``samples + neighbours`` new schedules."""
    T, elite = len(sigmas) - 1, elites[setting, k][1]
    with torch.no_grad():
        masks = policy.sample(torch.full((config.samples,), k), sigmas, generator)
        greedy = policy.logits(torch.tensor([k]), sigmas)[0].topk(k - 1).indices + 1
    drawn = [(0, *sorted(greedy.tolist()))] + [tuple(m.nonzero().squeeze(1).tolist()) for m in masks]
    drawn += _one_removed(elites.get((setting, k + 1)), generator) + _one_added(elites.get((setting, k - 1)), T,
                                                                             generator)
    wanted = config.samples + config.neighbours
    fresh = [s for s in dict.fromkeys(drawn) if s not in seen][:wanted]
    for _ in range(3):  # a small k near its optimum can have few unseen neighbours left
        more = relocations(elite, T, wanted - len(fresh), config.window, generator) if len(fresh) < wanted else []
        fresh += [s for s in more if s not in seen and s not in fresh]
    return fresh[:wanted]


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


def improve(policy: NoiseLevelPolicy, grids: list[torch.Tensor], objectives: list, elites: dict[Key, tuple],
            memo: list[dict], keys: list[Key], config: ExpertConfig, generator: torch.Generator) -> tuple[int, int]:
    """Steps 2-3 of a round for ``keys``: propose, score per setting (each schedule once: ``memo[setting]`` keeps
    every loss), keep what beats an elite. Returns how many elites improved and how many schedules were scored."""
    by_setting: dict[int, list[tuple[int, Steps]]] = {}
    for setting, k in keys:
        for steps in proposals(policy, grids[setting], k, elites, setting, memo[setting], config, generator):
            by_setting.setdefault(setting, []).append((k, steps))
    improved = scored = 0
    for setting, items in by_setting.items():
        for (k, steps), loss in zip(items, objectives[setting]([s for _, s in items]), strict=True):
            memo[setting][steps] = loss
            scored += 1
            if loss < elites[setting, k][0]:
                elites[setting, k], improved = (loss, steps), improved + 1
    return improved, scored


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
