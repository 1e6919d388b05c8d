"""A ReCache training run around ``reinforce_update``: setup, resume, checkpoints, ranks, Ctrl-C and the guard.

``train_recache`` writes ``checkpoint.safetensors`` after every update, ``train_log.jsonl`` and ``policy/``. An
interrupted run resumed with ``resume=True`` loses at most the update it was in, and ends bit for bit where an
uninterrupted run ends. Under torchrun, each of the W ranks rolls out ``config.pairs`` of the update's ``W * pairs``
pairs (all ranks draw the same pairs, budgets and schedules from the run's seed; rank r takes block r), the gradients
are summed over ranks and every rank steps the same policy: W ranks with ``pairs = B`` train the policy one rank with
``pairs = W B`` trains. Only rank 0 writes files and shows progress. After the last update, ``calibration_guard``
keeps the uniform schedule for any budget where the learned one does not beat it on calibration pairs (ours: a
trained policy is then never worse than uniform on the data it was fitted to).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import trange

from recache import distributed
from recache._version import __version__
from recache.checkpoint import load_checkpoint, save_checkpoint
from recache.errors import NonFiniteError, RecacheError, is_whole
from recache.io import folder_lock, read_jsonl, remove_stale_temporaries, write_json, write_jsonl
from recache.mechanisms import get_mechanism
from recache.metrics.reward import OutputReward, Reward
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.policies.reinforce import Pool, TrainConfig, draw, reinforce_update, reward_for
from recache.protocol import calibration_pairs
from recache.sampling.interface import Sampler, sampler_identity
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

CHECKPOINT, LOG, POLICY = "checkpoint.safetensors", "train_log.jsonl", "policy"
GUARD_PAIRS = 64  # the first calibration pairs, on which every budget's learned schedule is checked against uniform


def seeds_hash(classes: torch.Tensor, seeds: list[int]) -> str:
    return hashlib.sha256(json.dumps([classes.tolist(), seeds]).encode()).hexdigest()[:16]


def train_recache(config: TrainConfig, out: str | Path, pipe: Sampler | None = None, resume: bool = False,
                  progress: bool = True) -> ReCachePolicy:
    """Train (or resume) a policy on ``pipe`` (the embedded ``DigitPipeline`` by default, or a diffusers pipeline as
    ``DiffusersRollouts``, where conditions are prompts) into ``out`` (see the module docstring)."""
    run = _Run(config, Path(out), pipe or DigitPipeline.from_pretrained(), progress and distributed.is_main())
    with folder_lock(run.out, enabled=distributed.is_main()):
        return _train(run, resume)


def _train(run: _Run, resume: bool) -> ReCachePolicy:
    run.start(resume)
    try:
        run.updates()
        run.policy.eval()
        fallback = calibration_guard(run.policy, run.pipe, run.mechanism, run.reward, run.pool, run.out, run.progress)
    except distributed.RankLost as e:
        run.save_unsaved()  # stopped after an update was done but before its checkpoint was whole: write it now
        raise distributed.RankLost(f"{e}; the last checkpoint ({run.out / CHECKPOINT}, {run.saved} updates) is intact: "
                                   "resume with --resume") from None
    except KeyboardInterrupt:
        run.save_unsaved()  # the same for Ctrl-C
        raise KeyboardInterrupt(f"the checkpoint {run.out / CHECKPOINT} holds {run.saved} updates: resume with "
                                "--resume") from None
    run.policy.config = replace(run.policy.config, fallback=fallback)
    if distributed.is_main():
        run.policy.save_pretrained(run.out / POLICY)
    return run.policy


class _Run:
    """The state of one training run: policy, optimiser, generator, pool of pairs, log and the last checkpoint."""

    def __init__(self, config: TrainConfig, out: Path, pipe: Sampler, progress: bool):
        self.config, self.out, self.pipe, self.progress = config, out, pipe, progress
        self.ranks = distributed.world_size()
        self.mechanism = get_mechanism(config.mechanism)
        self.reward = reward_for(pipe, config.fidelity, config.alpha)
        for k in (config.k_min, config.k_max):
            if k < 2:
                raise RecacheError(f"the trained budget range starts at k=2 (one free step to place), got {k}")
        if config.k_max == pipe.steps:
            raise RecacheError(f"--k-max {config.k_max} is T: that budget computes every step, there is nothing to "
                               f"learn; train budgets up to T - 1 = {pipe.steps - 1}")
        if config.pool < self.ranks:
            raise RecacheError(f"pool {config.pool} is smaller than the {self.ranks} ranks: every rank needs "
                               "calibration pairs")
        self.conds, self.seeds = calibration_pairs(config.pool, num_conditions=pipe.num_conditions)
        with torch.random.fork_rng():  # the initial weights depend on the run's seed only
            torch.manual_seed(config.seed)
            training = {**asdict(config), "ranks": self.ranks, "guidance": pipe.guidance,
                        "seeds_hash": seeds_hash(self.conds, self.seeds), "library_version": __version__}
            self.policy = ReCachePolicy(ReCacheConfig(
                T=pipe.steps, k_min=config.k_min, k_max=config.k_max, model=pipe.model_id,
                sigmas=pipe.sigma_schedule, mechanism=config.mechanism, training=training))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = sampler_identity(pipe)

    def start(self, resume: bool) -> None:
        """Restore a checkpoint (rank 0, shared with all ranks) and compute the uncached targets of the pool."""
        if distributed.is_main():
            remove_stale_temporaries(self.out)  # a killed run's half-written files; the folder is locked
        self.first, self.log = distributed.on_main(lambda: self._restore(resume))
        self.saved = self.first
        _share_state(self.policy, self.optimizer, self.generator)
        targets, features = _targets(self.pipe, self.reward, self.conds, self.seeds)
        self.pool = Pool(self.conds, self.seeds, targets, features)

    def updates(self) -> None:
        config = self.config
        for update in trange(self.first, config.updates, initial=self.first, total=config.updates,
                             desc=f"train {config.mechanism}", disable=not self.progress):
            began = time.perf_counter()
            batch = draw(config, update, self.ranks, self.generator)
            beta = config.entropy * (1 - update / config.updates)
            sums = reinforce_update(self.policy, self.optimizer, self.pipe, self.mechanism, self.reward, self.pool,
                                    batch, beta, self.generator)
            if not all(torch.isfinite(p).all() for p in self.policy.parameters()):
                raise NonFiniteError(f"the policy's weights became non-finite at update {update} (lr {config.lr} too "
                                     f"large?); the checkpoint holds {self.saved} updates")
            rollouts, pairs = len(batch.budgets) * config.group, len(batch.budgets)
            self.log.append({"update": update, "k": batch.budgets.tolist(), "reward": sums[0].item() / rollouts,
                             "fidelity": sums[1].item() / rollouts, "quality": sums[2].item() / rollouts,
                             "entropy": sums[3].item() / pairs, "beta": beta, "loss": sums[4].item(),
                             "seconds": round(time.perf_counter() - began, 4)})
            self.checkpoint(update + 1)

    def checkpoint(self, updates: int) -> None:
        if distributed.is_main():
            write_jsonl(self.out / LOG, self.log)
            extra = {"config": asdict(self.config), "ranks": self.ranks, "sampler": self.sampler}
            save_checkpoint(self.out / CHECKPOINT, {"policy": self.policy}, self.optimizer, {"train": self.generator},
                            updates, extra)
        self.saved = updates

    def save_unsaved(self) -> None:
        if len(self.log) > self.saved:
            self.checkpoint(len(self.log))

    def _restore(self, resume: bool) -> tuple[int, list[dict]]:
        """Rank 0: the update to start from and the log so far, after loading the checkpoint when resuming."""
        out, config = self.out, self.config
        if not (out / CHECKPOINT).exists():
            return 0, []
        if not resume:
            raise RecacheError(f"{out} already holds a training run; resume it (--resume) or choose another --out")
        start, extra = load_checkpoint(out / CHECKPOINT, {"policy": self.policy}, self.optimizer,
                                       {"train": self.generator})
        if start > config.updates:
            saved_config = extra.get("config")
            planned = saved_config.get("updates", start) if isinstance(saved_config, dict) else start
            raise RecacheError(f"{out} already holds {start} updates, more than the {config.updates} asked for; "
                               f"resume it with its own --updates {planned}, or choose another --out")
        if start < 0:
            raise RecacheError(f"checkpoint {out / CHECKPOINT} claims {start} updates; delete it to start afresh")
        if extra.get("sampler", self.sampler) != self.sampler:
            raise RecacheError(f"{out} was trained on another sampler ({extra['sampler']}); resume with the same "
                               "model, steps, sigmas and guidance")
        if extra.get("config") != asdict(config):
            raise RecacheError(f"{out} was trained with other settings ({extra.get('config')}); resume with the "
                               "same ones")
        if extra.get("ranks", 1) != self.ranks:
            raise RecacheError(f"{out} was trained on {extra.get('ranks', 1)} ranks (pairs per update = pairs x "
                               f"ranks), not {self.ranks}; resume it with --nproc {extra.get('ranks', 1)}")
        logged = read_jsonl(out / LOG, "training log")
        return start, [row for row in logged if is_whole(row.get("update"), 0, start - 1)]


def _targets(pipe: Sampler, reward, classes: torch.Tensor, seeds: list[int], chunk: int = 64):
    """The uncached outputs of every pair and their reward features; each rank samples its shard, all get all."""
    mine = distributed.shard(len(seeds))
    classes, seeds = classes[mine], seeds[mine]
    images = torch.cat([pipe(classes[i:i + chunk], seeds[i:i + chunk]) for i in range(0, len(seeds), chunk)])
    images = distributed.all_gather_rows(images)
    return images, reward.features(images)


def _share_state(policy: ReCachePolicy, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Rank 0's policy, optimiser and generator on every rank (DDP's start-up broadcast, with the generator)."""
    if not distributed.is_distributed():
        return
    state = distributed.broadcast_from_main({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                                             "rng": generator.get_state()})
    if not distributed.is_main():
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])


def calibration_guard(policy: ReCachePolicy, pipe: Sampler, mechanism, reward: Reward | OutputReward, pool: Pool,
                      out: Path, progress: bool = True, pairs: int = GUARD_PAIRS) -> list[int]:
    """The budgets whose learned schedule does not beat the uniform one on mean reward over the first ``pairs``
    calibration pairs of ``pool``. Writes ``guard.json``."""
    n, fallback, report = min(pairs, len(pool.seeds)), [], []
    mine = distributed.shard(n)  # each rank scores its block of the pairs; the sums are joined
    classes, seeds, m = pool.conds[:n][mine], pool.seeds[:n][mine], mine.stop - mine.start
    targets, features = pool.targets[mine].repeat(2, *[1] * (pool.targets.dim() - 1)), pool.features[mine].repeat(2, 1)
    for k in trange(policy.config.k_min, policy.config.k_max + 1, desc="guard", disable=not progress):
        schedules = [policy.schedule(k, guarded=False), Schedule.uniform(policy.T, k)]
        images, _ = pipe.rollout(classes, seeds, schedules, mechanism)
        r = reward(images.flatten(0, 1), targets, features, classes.repeat(2))
        learned, uniform = (distributed.all_reduce_sum(r["reward"].cpu().view(2, m).double().sum(1)) / n).tolist()
        if learned <= uniform:
            fallback.append(k)
        report.append({"k": k, "learned_reward": learned, "uniform_reward": uniform, "fallback": learned <= uniform})
    if distributed.is_main():
        write_json(out / "guard.json", {"pairs": n, "budgets": report})
    return fallback
