"""ReCache's learning rule: REINFORCE against the uncached output (Williams 1992; Kool et al. 2019).

Per update: draw ``pairs`` (condition, seed) pairs from the calibration pool and a budget ``k ~ U{k_min..k_max}`` for
each, ``group`` schedules per pair from the policy, run all of them in one batched cached rollout, score them with
the reward against the pair's uncached sample (computed once), and step the policy on
``L = -mean_i(A_i log p(w_i | k)) - beta * mean H(k)`` with the leave-one-out advantage
``A_i = (R_i - mean_{j != i} R_j) / mean_j D_j``. Dividing by the group's mean distance (our choice; the paper does
not publish its estimator's details) gives every budget the same weight, although distances at k = 4 are ten times
those at k = 25. ``beta`` decays linearly to 0. No gradient flows through the diffusion model.

This module is the algorithm, readable on its own: ``draw`` and ``reinforce_update``. The run around it (resume,
checkpoints, ranks, Ctrl-C, the calibration guard) is ``recache.policies.training``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recache import distributed
from recache.errors import NonFiniteError, RecacheError
from recache.mechanisms import Mechanism
from recache.metrics.reward import OutputReward, Reward
from recache.models.pretrained import load_classifier
from recache.policies.recache import ReCachePolicy
from recache.sampling.interface import Sampler


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; all are our choices where the paper is silent."""

    mechanism: str = "taylorseer"
    k_min: int = 4
    k_max: int = 25
    updates: int = 250
    pairs: int = 4  # (class, seed) pairs per update, each with its own budget
    group: int = 8  # schedules per pair (G) for the leave-one-out baseline
    lr: float = 3e-3
    entropy: float = 1e-2  # beta at the first update, linearly decayed to 0
    fidelity: str = "rel_l2"
    alpha: float = 0.0
    pool: int = 128  # calibration pairs: seeds 0..pool-1, never the held-out ones
    seed: int = 0

    def __post_init__(self):
        for name in ("updates", "pairs", "pool"):
            if getattr(self, name) < 1:
                raise RecacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group < 2:
            raise RecacheError(f"group must be >= 2 for a leave-one-out baseline, got {self.group}")
        if not (0 < self.lr <= 1 and 0 <= self.entropy <= 10):
            raise RecacheError(f"lr must be in (0, 1] and entropy in [0, 10], got lr={self.lr}, entropy={self.entropy}")
        if self.pairs > self.pool:
            raise RecacheError(f"--pairs {self.pairs} is more than the --pool of {self.pool} calibration pairs "
                               "they are drawn from")
        if self.pairs * self.group > 100_000 or self.pool > 100_000:
            raise RecacheError(f"pairs x group = {self.pairs * self.group} rollouts per update and pool = {self.pool} "
                               "must each be at most 100000 (they are held in memory at once)")


@dataclass(frozen=True)
class Pool:
    """The calibration pairs of a run with their uncached outputs (the rewards' targets) and reward features."""

    conds: torch.Tensor
    seeds: list[int]
    targets: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class Draw:
    """One update's pairs and budgets. Every rank draws the same ``budgets`` (one per pair of the update, over all
    ranks) and rolls out its block ``mine`` of the pairs: ``pairs`` holds the pool index of each of its rows."""

    pairs: torch.Tensor
    budgets: torch.Tensor
    group: int
    mine: slice
    update: int

    @property
    def rows(self) -> slice:
        """This rank's rows among the update's ``len(budgets) * group`` schedules."""
        return slice(self.mine.start * self.group, self.mine.stop * self.group)


def draw(config: TrainConfig, update: int, ranks: int, generator: torch.Generator) -> Draw:
    """The pairs and budgets of one update, from the run's generator (the same on every rank)."""
    P, G = config.pairs * ranks, config.group
    mine = distributed.shard(P)
    pairs = torch.randint(config.pool, (P,), generator=generator).repeat_interleave(G)
    budgets = torch.randint(config.k_min, config.k_max + 1, (P,), generator=generator)
    return Draw(pairs[mine.start * G:mine.stop * G], budgets, G, mine, update)


def reinforce_update(policy: ReCachePolicy, optimizer: torch.optim.Optimizer, pipe: Sampler, mechanism: Mechanism,
                     reward: Reward | OutputReward, pool: Pool, batch: Draw, beta: float,
                     generator: torch.Generator) -> torch.Tensor:
    """One update: sample G schedules per budget -> roll them out -> reward -> leave-one-out advantage -> loss ->
    step. Returns the sums over all ranks of reward, fidelity, quality, entropy and the loss."""
    G, P, k = batch.group, len(batch.budgets), batch.budgets[batch.mine]
    masks, logp = policy.sample(batch.budgets.repeat_interleave(G), generator)
    conds, seeds = pool.conds[batch.pairs], [pool.seeds[i] for i in batch.pairs]
    with torch.no_grad():
        images, passes = pipe.rollout_rows(conds, seeds, masks[batch.rows], mechanism)
    if not torch.equal(passes.cpu(), k.repeat_interleave(G)):
        raise RuntimeError(f"realised full passes {passes.tolist()} differ from the budgets {k.tolist()}")
    parts = {name: v.cpu() for name, v in
             reward(images, pool.targets[batch.pairs], pool.features[batch.pairs], conds).items()}
    check_rewards(parts["reward"], conds, seeds, batch.update)
    R, D = parts["reward"].view(-1, G), parts["fidelity"].view(-1, G)
    advantage = (R - (R.sum(1, keepdim=True) - R) / (G - 1)) / D.mean(1, keepdim=True).clamp_min(1e-8)
    entropy = policy.entropy(k)
    # this rank's share of -mean(A log p) - beta mean H over all P G rows; the ranks' gradients sum to the whole
    loss = -(advantage.flatten() * logp[batch.rows]).sum() / (P * G) - beta * entropy.sum() / P
    optimizer.zero_grad()
    loss.backward()
    distributed.sum_gradients(policy.parameters())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    sums = torch.stack([R.sum(), D.sum(), parts["quality"].sum(), entropy.sum(), loss]).detach().double()
    return distributed.all_reduce_sum(sums)


def check_rewards(rewards: torch.Tensor, conds: torch.Tensor, seeds: list[int], update: int) -> None:
    if not torch.isfinite(rewards).all():
        row = int((~torch.isfinite(rewards)).nonzero()[0])
        raise NonFiniteError(f"non-finite reward {rewards[row].item()} at update {update} for condition "
                             f"{int(conds[row])}, seed {seeds[row]}")


def reward_for(pipe: Sampler, fidelity: str = "rel_l2", alpha: float = 0.0) -> Reward | OutputReward:
    """The reward of a training run: the digit classifier's on digit outputs, ``OutputReward`` on any other sampler."""
    if pipe.outputs_digits:
        return Reward(load_classifier(), fidelity, alpha)
    return OutputReward(fidelity, alpha, pipe.condition_texts())
