"""BudCache stage 1: search the schedule for one fixed budget (arXiv 2606.13496; the authors' public code).

Objective: ``L(S) = mean((x(S) - x*)^2)`` of the final cached output against the uncached one, averaged over a
calibration set of (class, seed) pairs (the reference code uses one prompt and one seed). The state is the set of
computed steps; steps ``0..p-1`` with ``p = max(1, k // 4)`` are always computed and never moved.

1. Simulated annealing, ``I`` iterations: temperature ``t_max (t_min / t_max)^(it / I)``; a proposal relocates one
   computed step (probability 0.9; to a cached step within 3 with probability 0.7, else anywhere) or two at once;
   Metropolis acceptance ``exp(-dL / t)``.
2. Steepest-descent hill climbing over the relocation neighbourhood (every move of a computed step within 3, plus
   two random far jumps per step), at most ``hc_iters`` moves, stopping when no neighbour is strictly better.
3. Restarts share the memo (every schedule is evaluated once) and the global best.

Kept from the reference: the moves, their probabilities, the prefix, geometric cooling, the neighbourhood, MSE on
the final output. Changed, deliberately: the search is seeded (deterministic); the initial state is scored (the
reference can return "no cache" with loss inf); hill climbing starts from the global best of annealing (as the
reference's Wan script, not its FLUX script); several calibration pairs by default; candidates and neighbourhoods
are evaluated with batched rollouts. Ours: ``start`` begins the first restart from a given schedule (a path plan,
``path_planning.py``) instead of a random one; the fixed prefix is then the part of ``0..p-1`` it computes.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recache import distributed
from recache.errors import RecacheError
from recache.io import folder_lock, read_json, read_jsonl, remove_stale_temporaries, write_json, write_jsonl
from recache.mechanisms import Mechanism, get_mechanism
from recache.protocol import calibration_pairs
from recache.sampling.interface import Sampler, sampler_identity
from recache.schedule import Schedule, check_budget


@dataclass(frozen=True)
class SearchConfig:
    """Settings of one search; the defaults follow the reference FLUX config except the calibration set."""

    k: int
    mechanism: str = "taylorseer"
    pairs: int = 8  # calibration (class, seed) pairs, seeds 0..pairs-1
    sa_iters: int = 200
    t_max: float = 0.05
    t_min: float = 1e-5
    hc_iters: int = 20
    restarts: int = 1
    window: int = 3
    far_jumps: int = 2
    seed: int = 0
    start: tuple[int, ...] | None = None  # the first restart's initial schedule (computed steps); None: random

    def __post_init__(self):
        for name in ("pairs", "restarts"):
            if getattr(self, name) < 1:
                raise RecacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sa_iters < 0 or self.hc_iters < 0 or self.sa_iters + self.hc_iters == 0:
            raise RecacheError(f"need some iterations: sa_iters={self.sa_iters}, hc_iters={self.hc_iters} "
                               "(both >= 0, not both 0)")
        if not 0 < self.t_min <= self.t_max:
            raise RecacheError(f"temperatures must satisfy 0 < t_min <= t_max, got {self.t_min}, {self.t_max}")

    @property
    def prefix(self) -> int:
        return max(1, self.k // 4)

    def settings(self) -> dict:
        """The settings as a search records them (``start`` only when given, so earlier searches still resume)."""
        return {k: v for k, v in asdict(self).items() if not (k == "start" and v is None)}


Steps = tuple[int, ...]


class BudCacheSearch:
    """``run()`` returns the best schedule found; ``evaluate(list of step tuples) -> losses`` is the (batched)
    objective.

    ``history`` lists every objective evaluation in order; ``memo`` maps each evaluated schedule to its loss, and
    can be pre-filled (from a previous run's history) to resume a search without repeating its rollouts."""

    def __init__(self, T: int, config: SearchConfig, evaluate: Callable[[list[Steps]], list[float]],
                 memo: dict[Steps, float] | None = None, progress: bool = True):
        check_budget(config.k, T)
        if config.k == T:
            raise RecacheError(f"budget k={config.k} equals T: every step is computed, there is nothing to search")
        if config.k == 1:
            raise RecacheError("budget k=1 has one schedule, step 0 alone: there is nothing to search")
        self.T, self.config, self._evaluate, self.progress = T, config, evaluate, progress
        self.memo: dict[Steps, float] = dict(memo or {})
        self.history: list[dict] = []
        self.rng = random.Random(config.seed)
        self.best: tuple[float, Steps] = (math.inf, ())
        self.prefix = config.prefix
        if config.start is not None:
            start = tuple(config.start)
            if len(start) != config.k or list(start) != sorted(set(start)) or start[0] != 0 or start[-1] >= T:
                raise RecacheError(f"the search's start must be {config.k} distinct steps from 0 to {T - 1}, "
                                   f"step 0 first; got {list(start)[:60]}")
            self.prefix = next((q for q in range(config.prefix, 0, -1) if set(range(q)) <= set(start)), 1)
        self.starts = [tuple(config.start)] if config.start is not None else []

    def loss(self, candidates: list[Steps], phase: str) -> list[float]:
        new = [c for c in dict.fromkeys(candidates) if c not in self.memo]
        if new:
            for c, value in zip(new, self._evaluate(new), strict=True):
                self.memo[c] = value
        for c in candidates:
            self.best = min(self.best, (self.memo[c], c))
        self.history += [{"evaluation": len(self.history), "phase": phase, "steps": list(c), "loss": self.memo[c],
                          "best_loss": self.best[0], "new": c in new} for c in candidates]
        return [self.memo[c] for c in candidates]

    def initial(self) -> Steps:
        if self.starts:
            return self.starts.pop()
        p, k = self.prefix, self.config.k
        return tuple(sorted([*range(p), *self.rng.sample(range(p, self.T), k - p)]))

    def propose(self, state: Steps) -> Steps:
        p = self.prefix
        computed = [s for s in state if s >= p]
        cached = [s for s in range(p, self.T) if s not in state]
        moves = 1 if self.rng.random() < 0.9 or len(computed) < 2 or len(cached) < 2 else 2
        if moves == 1:
            src = self.rng.choice(computed)
            near = [z for z in cached if abs(z - src) <= self.config.window]
            dst = [self.rng.choice(near if near and self.rng.random() < 0.7 else cached)]
            src = [src]
        else:
            src, dst = self.rng.sample(computed, 2), self.rng.sample(cached, 2)
        return tuple(sorted((set(state) - set(src)) | set(dst)))

    def neighbours(self, state: Steps) -> list[Steps]:
        p, w, T = self.prefix, self.config.window, self.T
        out = []
        for c in (s for s in state if s >= p):
            targets = (list(range(max(p, c - w), min(T - 1, c + w) + 1))
                       + [self.rng.randrange(p, T) for _ in range(self.config.far_jumps)])
            for j in targets:
                if j not in state:
                    out.append(tuple(sorted((set(state) - {c}) | {j})))
        return list(dict.fromkeys(out))

    def anneal(self, state: Steps, bar) -> Steps:
        """Simulated annealing from ``state``; returns the best state it visited."""
        cfg = self.config
        current = self.loss([state], "init")[0]
        best = (current, state)
        for it in range(cfg.sa_iters):
            temperature = cfg.t_max * (cfg.t_min / cfg.t_max) ** (it / cfg.sa_iters)
            candidate = self.propose(state)
            value = self.loss([candidate], "anneal")[0]
            if value < current or self.rng.random() < math.exp(-(value - current) / temperature):
                state, current = candidate, value
                best = min(best, (current, state))
            bar.update(1)
            bar.set_postfix(best=f"{self.best[0]:.3g}")
        return best[1]

    def climb(self, state: Steps, bar) -> Steps:
        current = self.loss([state], "climb")[0]
        for _ in range(self.config.hc_iters):
            candidates = self.neighbours(state)
            if not candidates:
                break
            values = self.loss(candidates, "climb")
            value, candidate = min(zip(values, candidates, strict=True))
            bar.update(1)
            if value >= current:
                break
            state, current = candidate, value
        return state

    def run(self) -> Steps:
        cfg = self.config
        with tqdm(total=cfg.restarts * (cfg.sa_iters + cfg.hc_iters), desc=f"search k={cfg.k}",
                  disable=not self.progress) as bar:
            for _ in range(cfg.restarts):
                self.climb(self.anneal(self.initial(), bar), bar)
        return self.best[1]

    def schedule(self, **metadata) -> Schedule:
        return Schedule.from_steps(self.T, self.best[1], source="budcache", search_loss=self.best[0],
                                   evaluations=len(self.memo), search=self.config.settings(), **metadata)


def rollout_objective(pipe: Sampler, mechanism: Mechanism, classes: torch.Tensor, seeds: list[int],
                      targets: torch.Tensor, chunk: int = 8) -> Callable[[list[Steps]], list[float]]:
    """``L(S)`` = MSE of the final output to ``targets`` over the pairs, for many schedules in batched rollouts of
    ``chunk`` schedules at a time (rows that compute a step run the blocks together). Under torchrun, ``classes``,
    ``seeds`` and ``targets`` are this rank's block of the pairs, and the per-pair errors are summed over ranks."""
    T, total = pipe.steps, round(distributed.all_reduce_sum(torch.tensor([float(len(seeds))])).item())

    def evaluate(candidates: list[Steps]) -> list[float]:
        sums = []
        for i in range(0, len(candidates), chunk):
            schedules = [Schedule.from_steps(T, c) for c in candidates[i:i + chunk]]
            images, passes = pipe.rollout(classes, seeds, schedules, mechanism)
            if not all(torch.all(p == s.k) for p, s in zip(passes, schedules, strict=True)):
                raise RuntimeError("a rollout did not run its budget exactly")
            sums.append(((images - targets[None]) ** 2).flatten(2).mean(2).double().sum(1).cpu())
        return (distributed.all_reduce_sum(torch.cat(sums)) / total).tolist()

    return evaluate


MEMO, HISTORY, SCHEDULE, SEARCH = "memo.jsonl", "history.jsonl", "schedule.json", "search.json"


def search_schedule(config: SearchConfig, pipe: Sampler, out, resume: bool = False,
                    progress: bool = True) -> tuple[Schedule, list[dict]]:
    """Search on calibration pairs (seeds ``0..pairs-1``) and write ``schedule.json``, ``history.jsonl`` (every
    evaluation in order) and ``memo.jsonl`` (each new loss as soon as it is known) into ``out``. With ``resume``, the
    losses in ``memo.jsonl`` are reused: the seeded search replays to where it stopped without repeating rollouts.

    Under torchrun every rank runs the same seeded search; each rolls out its block of the pairs, the losses are
    summed over ranks, so all ranks take the same steps. Only rank 0 writes files and shows progress."""
    out, main = Path(out), distributed.is_main()
    if config.pairs < distributed.world_size():
        raise RecacheError(f"{config.pairs} calibration pairs cannot be shared by {distributed.world_size()} ranks; "
                           "use --pairs >= the ranks")
    identity = {"search": config.settings(), **sampler_identity(pipe)}
    memo = distributed.on_main(lambda: _read_memo(out, resume, identity))
    classes, seeds = calibration_pairs(config.pairs, num_conditions=pipe.num_conditions)
    mine = distributed.shard(config.pairs)
    classes, seeds = classes[mine], seeds[mine]

    def evaluate_and_record(candidates):
        losses = objective(candidates)
        if main:
            try:
                with open(out / MEMO, "a") as f:
                    f.writelines(json.dumps({"steps": list(c), "loss": v}) + "\n"
                                 for c, v in zip(candidates, losses, strict=True))
            except OSError as e:
                raise RecacheError(f"cannot add to {out / MEMO} ({e.strerror or e}); the search stopped, and a "
                                   "resume (--resume) repeats only what that file lacks") from None
        return losses

    search = BudCacheSearch(pipe.steps, config, evaluate_and_record, memo, progress and main)  # checks the budget first
    with folder_lock(out, enabled=main):
        if main:
            remove_stale_temporaries(out)  # a killed search's half-written files; the folder is locked
        objective = rollout_objective(pipe, get_mechanism(config.mechanism), classes, seeds, pipe(classes, seeds))
        if main:
            write_json(out / SEARCH, identity)
        try:
            search.run()
            uniform_loss = objective([tuple(Schedule.uniform(pipe.steps, config.k).steps)])[0]  # for the report
        except distributed.RankLost as e:
            raise distributed.RankLost(f"{e}; the {len(search.memo)} losses evaluated are kept in {out / MEMO}: "
                                       "resume with --resume") from None
        schedule = search.schedule(model=pipe.model_id, mechanism=config.mechanism, sigmas=pipe.sigma_schedule,
                                   calibration_seeds=[0, config.pairs - 1], uniform_loss=uniform_loss)
        if main:
            write_jsonl(out / HISTORY, search.history)
            schedule.save(out / SCHEDULE)
    return schedule, search.history


def _read_memo(out: Path, resume: bool, identity: dict) -> dict[Steps, float]:
    """The losses a previous search in ``out`` recorded (resume), or an error when ``out`` holds one and not resuming,
    or one made with other settings (``search.json``). Lines that are cut, damaged or not the loss of a k-step
    schedule are skipped (evaluated again)."""
    memo = {}
    if not (out / MEMO).exists():
        return memo
    if not resume:
        raise RecacheError(f"{out} already holds a search; resume it (--resume) or choose another --out")
    saved = read_json(out / SEARCH, "search settings") if (out / SEARCH).exists() else None
    if saved != json.loads(json.dumps(identity)):
        raise RecacheError(f"{out} holds a search with other settings ({out / SEARCH}); "
                           "resume with the same ones or choose another --out")
    k, T = identity["search"]["k"], identity["T"]
    for row in read_jsonl(out / MEMO, "search memo"):
        try:
            steps, loss = tuple(row["steps"]), row["loss"]
        except (KeyError, TypeError):
            continue
        whole = all(isinstance(s, int) and not isinstance(s, bool) for s in steps) and list(steps) == sorted(set(steps))
        if (whole and len(steps) == k and steps[0] == 0 and steps[-1] < T and isinstance(loss, int | float)
                and math.isfinite(loss) and loss >= 0):
            memo[steps] = float(loss)
    return memo
