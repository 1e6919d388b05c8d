"""Training a ReCache policy by REINFORCE against the uncached output (Williams 1992; Kool et al. 2019).

Per update: draw ``pairs`` (class, seed) pairs from the calibration pool and a budget ``k ~ U{k_min..k_max}`` for
each, ``group`` schedules per pair from the policy, run all of them in one batched cached rollout, score them with
``Reward`` against the pair's uncached sample (computed once), and step the policy on
``L = -mean_i(A_i log p(w_i | k)) - beta * mean H(k)`` with the leave-one-out advantage
``A_i = (R_i - mean_{j != i} R_j) / mean_j D_j``. Dividing by the group's mean distance (our choice; the paper does
not publish its estimator's details) gives every budget the same weight, although distances at k = 4 are ten times
those at k = 25. ``beta`` decays linearly to 0. No gradient flows through the diffusion model. After the last
update, ``calibration_guard`` keeps the uniform schedule for any budget where the learned one does not beat it on
calibration pairs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import trange

from recache import __version__, distributed
from recache.checkpoint import load_checkpoint, save_checkpoint
from recache.errors import NonFiniteError, RecacheError
from recache.evaluation.protocol import calibration_pairs
from recache.evaluation.report import write_jsonl
from recache.io import write_json
from recache.mechanisms import get_mechanism
from recache.metrics.reward import Reward, reward_for
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

CHECKPOINT, LOG, POLICY = "checkpoint.safetensors", "train_log.jsonl", "policy"
GUARD_PAIRS = 64  # the first calibration pairs, on which every budget's learned schedule is checked against uniform


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
        if self.pairs * self.group > 100_000 or self.pool > 100_000:
            raise RecacheError(f"pairs x group = {self.pairs * self.group} rollouts per update and pool = {self.pool} must each be "
                               "at most 100000 (they are held in memory at once)")


def seeds_hash(classes: torch.Tensor, seeds: list[int]) -> str:
    return hashlib.sha256(json.dumps([classes.tolist(), seeds]).encode()).hexdigest()[:16]


def _targets(pipe, reward, classes: torch.Tensor, seeds: list[int], chunk: int = 64):
    """The uncached outputs of every pair and their reward features; each rank samples its shard, all get all."""
    mine = distributed.shard(len(seeds))
    classes, seeds = classes[mine], seeds[mine]
    images = torch.cat([pipe(classes[i:i + chunk], seeds[i:i + chunk]) for i in range(0, len(seeds), chunk)])
    images = distributed.all_gather_rows(images)
    return images, reward.features(images)


def train_recache(config: TrainConfig, out: str | Path, pipe=None, resume: bool = False, progress: bool = True) -> ReCachePolicy:
    """Train (or resume) a policy on ``pipe`` (the embedded ``DigitPipeline`` by default, or a diffusers pipeline as
    ``DiffusersRollouts``, where conditions are prompts); writes ``checkpoint.safetensors`` after every update,
    ``train_log.jsonl`` and ``policy/`` (``save_pretrained``) into ``out``. An interrupted run resumed with
    ``resume=True`` loses at most the update it was in, and ends bit-for-bit where an uninterrupted run ends.

    Under torchrun, each of the W ranks rolls out ``config.pairs`` of the update's ``W * pairs`` pairs (all ranks
    draw the same pairs, budgets and schedules from the run's seed; rank r takes block r), the gradients are summed
    over ranks and every rank steps the same policy: W ranks with ``pairs = B`` train the policy one rank with
    ``pairs = W B`` trains. Only rank 0 writes files and shows progress."""
    out, ranks = Path(out), distributed.world_size()
    progress = progress and distributed.is_main()
    pipe = pipe or DigitPipeline.from_pretrained()
    mechanism = get_mechanism(config.mechanism)
    reward = reward_for(pipe, config.fidelity, config.alpha)
    for k in (config.k_min, config.k_max):
        if k < 2:
            raise RecacheError(f"the trained budget range starts at k=2 (one free step to place), got {k}")
    if config.pool < ranks:
        raise RecacheError(f"pool {config.pool} is smaller than the {ranks} ranks: every rank needs calibration pairs")
    classes, seeds = calibration_pairs(config.pool, num_conditions=pipe.num_conditions)
    with torch.random.fork_rng():  # the initial weights depend on the run's seed only
        torch.manual_seed(config.seed)
        policy = ReCachePolicy(ReCacheConfig(
            T=pipe.steps, k_min=config.k_min, k_max=config.k_max, model=pipe.model_id, sigmas=pipe.sigma_schedule,
            mechanism=config.mechanism, training={**asdict(config), "ranks": ranks, "guidance": pipe.guidance,
                                                  "seeds_hash": seeds_hash(classes, seeds), "library_version": __version__}))
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = {"model": pipe.model_id, "T": pipe.steps, "sigmas": pipe.sigma_schedule, "guidance": pipe.guidance}
    start, log = distributed.on_main(lambda: _restore(out, resume, config, ranks, sampler, policy, optimizer, generator))
    _share_state(policy, optimizer, generator)

    targets, target_features = _targets(pipe, reward, classes, seeds)
    G, P = config.group, config.pairs * ranks  # P: the update's pairs over all ranks
    mine = distributed.shard(P)  # this rank's pairs: block r of P
    rows = slice(mine.start * G, mine.stop * G)
    saved = start

    def checkpoint(updates: int) -> None:
        nonlocal saved
        if distributed.is_main():
            write_jsonl(out / LOG, log)
            extra = {"config": asdict(config), "ranks": ranks, "sampler": sampler}
            save_checkpoint(out / CHECKPOINT, {"policy": policy}, optimizer, {"train": generator}, updates, extra)
        saved = updates

    try:
        for update in trange(start, config.updates, initial=start, total=config.updates, desc=f"train {config.mechanism}", disable=not progress):
            began = time.perf_counter()
            idx = torch.randint(config.pool, (P,), generator=generator).repeat_interleave(G)[rows]
            k_all = torch.randint(config.k_min, config.k_max + 1, (P,), generator=generator)
            k = k_all[mine]
            masks, logp = policy.sample(k_all.repeat_interleave(G), generator)
            with torch.no_grad():
                images, passes = pipe.rollout_rows(classes[idx], [seeds[i] for i in idx], masks[rows], mechanism)
            if not torch.equal(passes.cpu(), k.repeat_interleave(G)):
                raise RuntimeError(f"realised full passes {passes.tolist()} differ from the budgets {k.tolist()}")
            parts = {name: v.cpu() for name, v in reward(images, targets[idx], target_features[idx], classes[idx]).items()}
            if not torch.isfinite(parts["reward"]).all():
                row = int((~torch.isfinite(parts["reward"])).nonzero()[0])
                raise NonFiniteError(f"non-finite reward {parts['reward'][row].item()} at update {update} for condition "
                                     f"{int(classes[idx[row]])}, seed {seeds[idx[row]]}")
            R, D = parts["reward"].view(-1, G), parts["fidelity"].view(-1, G)
            advantage = (R - (R.sum(1, keepdim=True) - R) / (G - 1)) / D.mean(1, keepdim=True).clamp_min(1e-8)
            beta = config.entropy * (1 - update / config.updates)
            entropy = policy.entropy(k)
            # this rank's share of -mean(A log p) - beta mean H over all P G rows; the ranks' gradients sum to the whole
            loss = -(advantage.flatten() * logp[rows]).sum() / (P * G) - beta * entropy.sum() / P
            optimizer.zero_grad()
            loss.backward()
            distributed.sum_gradients(policy.parameters())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            if not all(torch.isfinite(p).all() for p in policy.parameters()):
                raise NonFiniteError(f"the policy's weights became non-finite at update {update} (lr {config.lr} too large?); "
                                     f"the checkpoint holds {saved} updates")
            sums = distributed.all_reduce_sum(torch.stack([R.sum(), D.sum(), parts["quality"].sum(), entropy.sum(), loss]).detach().double())
            log.append({"update": update, "k": k_all.tolist(), "reward": sums[0].item() / (P * G), "fidelity": sums[1].item() / (P * G),
                        "quality": sums[2].item() / (P * G), "entropy": sums[3].item() / P, "beta": beta, "loss": sums[4].item(),
                        "seconds": round(time.perf_counter() - began, 4)})
            checkpoint(update + 1)
        policy.eval()
        fallback = calibration_guard(policy, pipe, mechanism, reward, classes[:GUARD_PAIRS], seeds[:GUARD_PAIRS], targets,
                                     target_features, out, progress)
    except distributed.RankLost as e:
        if len(log) > saved:  # stopped after an update was done but before its checkpoint was whole: write it now
            checkpoint(len(log))
        raise distributed.RankLost(f"{e}; the last checkpoint ({out / CHECKPOINT}, {saved} updates) is intact: "
                                   "resume with --resume") from None
    except KeyboardInterrupt:
        if len(log) > saved:  # the same for Ctrl-C
            checkpoint(len(log))
        raise KeyboardInterrupt(f"the checkpoint {out / CHECKPOINT} holds {saved} updates: resume with --resume") from None
    policy.config = replace(policy.config, fallback=fallback)
    if distributed.is_main():
        policy.save_pretrained(out / POLICY)
    return policy


def _restore(out: Path, resume: bool, config: TrainConfig, ranks: int, sampler: dict, policy, optimizer,
             generator) -> tuple[int, list[dict]]:
    """Rank 0: the update to start from and the log so far, after loading the checkpoint in ``out`` when resuming."""
    if not (out / CHECKPOINT).exists():
        return 0, []
    if not resume:
        raise RecacheError(f"{out} already holds a training run; resume it (--resume) or choose another --out")
    start, extra = load_checkpoint(out / CHECKPOINT, {"policy": policy}, optimizer, {"train": generator})
    if not 0 <= start <= config.updates:
        raise RecacheError(f"checkpoint {out / CHECKPOINT} claims {start} updates, not within 0-{config.updates}; delete it to start afresh")
    if extra.get("sampler", sampler) != sampler:
        raise RecacheError(f"{out} was trained on another sampler ({extra['sampler']}); resume with the same model, steps, sigmas and guidance")
    if extra.get("config") != asdict(config):
        raise RecacheError(f"{out} was trained with other settings ({extra.get('config')}); resume with the same ones")
    if extra.get("ranks", 1) != ranks:
        raise RecacheError(f"{out} was trained on {extra.get('ranks', 1)} ranks (pairs per update = pairs x ranks), not {ranks}; "
                           f"resume it with --nproc {extra.get('ranks', 1)}")
    return start, [row for row in read_log(out / LOG) if row["update"] < start]


def _share_state(policy: ReCachePolicy, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Rank 0's policy, optimiser and generator on every rank (DDP's start-up broadcast, with the generator)."""
    if not distributed.is_distributed():
        return
    state = distributed.broadcast_from_main({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "rng": generator.get_state()})
    if not distributed.is_main():
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])


def calibration_guard(policy: ReCachePolicy, pipe, mechanism, reward: Reward, classes: torch.Tensor, seeds: list[int],
                      targets: torch.Tensor, target_features: torch.Tensor, out: Path, progress: bool = True) -> list[int]:
    """The budgets whose learned schedule does not beat the uniform one on mean reward over the first calibration
    pairs (ours: a trained policy is then never worse than uniform on the data it was fitted to). Writes ``guard.json``."""
    n, fallback, report = len(seeds), [], []
    mine = distributed.shard(n)  # each rank scores its block of the pairs; the sums are joined
    classes, seeds, m = classes[mine], seeds[mine], mine.stop - mine.start
    for k in trange(policy.config.k_min, policy.config.k_max + 1, desc="guard", disable=not progress):
        schedules = [policy.schedule(k, guarded=False), Schedule.uniform(policy.T, k)]
        images, _ = pipe.rollout(classes, seeds, schedules, mechanism)
        r = reward(images.flatten(0, 1), targets[mine].repeat(2, *[1] * (targets.dim() - 1)), target_features[mine].repeat(2, 1), classes.repeat(2))
        learned, uniform = (distributed.all_reduce_sum(r["reward"].cpu().view(2, m).double().sum(1)) / n).tolist()
        if learned <= uniform:
            fallback.append(k)
        report.append({"k": k, "learned_reward": learned, "uniform_reward": uniform, "fallback": learned <= uniform})
    if distributed.is_main():
        write_json(out / "guard.json", {"pairs": n, "budgets": report})
    return fallback


def read_log(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []
