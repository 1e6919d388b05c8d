"""A ReCache v2 run around ``expert_iteration``: settings, resume, checkpoints, the per-setting guard, the policy.

``train_noise_level`` writes ``checkpoint.safetensors`` (policy, Adam, generator; the elites in its metadata) after
every round, ``train_log.jsonl`` (one row per round) and, at the end, ``guard.json`` and ``policy/``. A run resumed
with ``resume=True`` loses at most the round it was in and ends bit for bit where an uninterrupted one ends. The
guard (ours) checks, for every trained (T, grid, budget), the policy's schedule against the uniform one on
``GUARD_PAIRS`` fresh calibration pairs (seeds after the objective's) and keeps uniform where it does not win.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recache._version import __version__
from recache.checkpoint import load_checkpoint, save_checkpoint
from recache.errors import RecacheError, is_whole
from recache.io import folder_lock, read_jsonl, remove_stale_temporaries, write_json, write_jsonl
from recache.mechanisms import get_mechanism
from recache.policies.budcache import rollout_objective
from recache.policies.expert_iteration import WARM_POWERS, ExpertConfig, SplitObjective, distil, improve, power_steps
from recache.policies.noise_level import NoiseLevelConfig, NoiseLevelPolicy, grid_name
from recache.protocol import calibration_pairs
from recache.sampling.interface import Sampler
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import fit_shift, get_sigmas
from recache.schedule import Schedule

CHECKPOINT, LOG, POLICY, GUARD = "checkpoint.safetensors", "train_log.jsonl", "policy", "guard.json"
GUARD_PAIRS = 16


@dataclass
class _Setting:
    T: int
    shift: float  # the fitted shift of the grid the sampler runs
    pipe: Sampler  # the sampler of this setting: its own T and grid
    sigmas: torch.Tensor  # that grid, T + 1 values
    objective: object  # Steps list -> losses on the objective's calibration pairs
    budgets: range = range(0)


def train_noise_level(config: ExpertConfig, out: str | Path, pipe: Sampler | None = None, resume: bool = False,
                      progress: bool = True) -> NoiseLevelPolicy:
    """Train (or resume) a v2 policy on the settings ``config.steps x config.shifts`` into ``out`` (module
    docstring). ``pipe`` gives the model, guidance and conditions: the embedded model (default) or a diffusers
    pipeline (``DiffusersRollouts``: its flow-matching scheduler is given each shift); its own T and grid are not
    used."""
    out, pipe = Path(out), pipe or DigitPipeline.from_pretrained()
    settings = _settings(config, pipe)
    policy = _new_policy(config, pipe, settings)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    grids = [s.sigmas for s in settings]
    with folder_lock(out):
        remove_stale_temporaries(out)
        first, log, memo, screened = _restore(out, resume, config, policy, optimizer, generator)
        uniform = _uniform_elites(settings, memo)
        elites = _elites(memo, settings)
        if first == 0:
            distil(policy, optimizer, grids, elites, config.final_steps // 3)
        keys = sorted(elites)
        for r in tqdm(range(first, config.rounds), initial=first, total=config.rounds, disable=not progress,
                      desc=f"train v2 {config.mechanism}"):
            began = time.perf_counter()
            improved, scored = improve(policy, grids, [s.objective for s in settings], elites, memo, screened,
                                       _round_keys(keys, settings, r, config), config, generator)
            loss = distil(policy, optimizer, grids, elites, config.distil_steps)
            log.append({"round": r, "improved": improved, "scored": scored, "distil_loss": loss,
                        **_progress(elites, uniform), "seconds": round(time.perf_counter() - began, 4)})
            _checkpoint(out, config, policy, optimizer, generator, (memo, screened), log, r + 1)
        distil(policy, optimizer, grids, elites, config.final_steps)
        policy.eval()
        fallback, ratios = guard_settings(policy, settings, config, out, progress)
        rollouts = (sum(map(len, memo)) * config.pairs + 2 * len(elites) * GUARD_PAIRS
                    + sum(len(dropped.keys() - kept.keys()) for dropped, kept in zip(screened, memo, strict=True))
                    * config.screen_pairs)
        policy.config = replace(policy.config, fallback=fallback, guard_ratios=ratios,
                                training={**policy.config.training, "rollouts": rollouts})
        policy.save_pretrained(out / POLICY)
    return policy


def _new_policy(config: ExpertConfig, pipe: Sampler, settings: list[_Setting]) -> NoiseLevelPolicy:
    """The untrained policy (its weights depend on the run's seed only); fills in each setting's budgets."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        training = {**asdict(config), "trainer": "expert-iteration", "guidance": pipe.guidance,
                    "library_version": __version__}
        policy = NoiseLevelPolicy(NoiseLevelConfig(
            settings=[{"T": s.T, "shift": s.shift} for s in settings], k_fraction=list(config.k_fraction),
            hidden=config.hidden, model=pipe.model_id, mechanism=config.mechanism,
            sigmas=pipe.sigma_schedule if isinstance(pipe, DigitPipeline) else grid_name(settings[0].shift),
            training=training))
    for s in settings:
        s.budgets = policy.config.budgets(s.T)
    return policy


def _settings(config: ExpertConfig, pipe: Sampler) -> list[_Setting]:
    """One sampler and objective per trained (T, shift), on the calibration pairs ``0..pairs-1``. A pipeline's grid
    is read from its scheduler (``DiffusersRollouts.sigmas``); the shift recorded is the one fitted to it."""
    mechanism = get_mechanism(config.mechanism)
    classes, seeds = calibration_pairs(config.pairs, num_conditions=pipe.num_conditions)
    settings = []
    for T in config.steps:
        for shift in config.shifts:
            if isinstance(pipe, DigitPipeline):
                grid = DigitPipeline(pipe.model, get_sigmas(f"shifted:{shift}", T), pipe.guidance, pipe.model_id,
                                     grid_name(shift))
                fitted = float(shift)
            else:
                grid = pipe.with_grid(T, shift)
                fitted = round(fit_shift(grid.sigmas)[0], 6)
            settings.append(_Setting(T, fitted, grid, grid.sigmas, _objective(grid, mechanism, classes, seeds,
                                                                               config.screen_pairs)))
    return settings


def _objective(pipe: Sampler, mechanism, classes, seeds, screen_pairs: int):
    """BudCache's objective on the pairs; with screening, as the first ``screen_pairs`` and the rest."""
    targets = pipe(classes, seeds)
    if not screen_pairs:
        return rollout_objective(pipe, mechanism, classes, seeds, targets)
    head, tail = slice(0, screen_pairs), slice(screen_pairs, None)
    return SplitObjective(rollout_objective(pipe, mechanism, classes[head], seeds[head], targets[head], chunk=16),
                          rollout_objective(pipe, mechanism, classes[tail], seeds[tail], targets[tail]),
                          screen_pairs / len(seeds))


def _uniform_elites(settings: list[_Setting], memo: list[dict]) -> dict:
    """The uniform schedule of every (setting, budget) and its loss; it and the other warm starts (``power_steps``)
    are scored into ``memo`` unless they are there."""
    uniform = {}
    for index, s in enumerate(settings):
        schedules = [tuple(Schedule.uniform(s.T, k).steps) for k in s.budgets]
        warm = [power_steps(s.T, k, power) for k in s.budgets for power in WARM_POWERS]
        new = [steps for steps in dict.fromkeys(schedules + warm) if steps not in memo[index]]
        memo[index].update(zip(new, s.objective(new) if new else [], strict=True))
        uniform.update({(index, k): (memo[index][steps], steps) for k, steps in zip(s.budgets, schedules, strict=True)})
    return uniform


def _elites(memo: list[dict], settings: list[_Setting]) -> dict:
    """The best scored schedule of every (setting, budget): the first of the lowest loss, in the order scored."""
    elites = {}
    for index, s in enumerate(settings):
        for steps, loss in memo[index].items():
            key = (index, len(steps))
            if key[1] in s.budgets and (key not in elites or loss < elites[key][0]):
                elites[key] = (loss, steps)
    return elites


def _round_keys(keys: list, settings: list[_Setting], r: int, config: ExpertConfig) -> list:
    """Round ``r``'s keys: the next ``budgets_per_round`` of a cycle in which each (setting, budget) appears once per
    10 steps of its T (ours: a longer grid has more schedules to search), each pass in its own seeded order, so a
    resumed run takes the same ones."""
    cycle = [key for key in keys for _ in range(max(1, round(settings[key[0]].T / 10)))]
    n, B, chosen = len(cycle), min(config.budgets_per_round, len(keys)), []
    for position in range(r * B, r * B + B):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + position // n))
        chosen.append(cycle[int(order[position % n])])
    return list(dict.fromkeys(chosen))


def _progress(elites: dict, uniform: dict) -> dict:
    """The log's measures of progress: the elites' mean loss, and its mean ratio to the uniform schedule's."""
    ratios = [loss / max(uniform[key][0], 1e-12) for key, (loss, _) in elites.items()]
    return {"elite_loss": sum(loss for loss, _ in elites.values()) / len(elites),
            "elite_vs_uniform": sum(ratios) / len(ratios)}


def _checkpoint(out: Path, config: ExpertConfig, policy, optimizer, generator, scores: tuple[list, list], log: list,
                rounds: int) -> None:
    """The run after ``rounds`` rounds: the log, then policy, Adam, generator and every scored schedule (in order):
    ``scores`` is the memo (losses on all pairs) and the screened losses."""
    write_jsonl(out / LOG, log)
    memo, screened = ([[[list(steps), loss] for steps, loss in setting.items()] for setting in part] for part in scores)
    save_checkpoint(out / CHECKPOINT, {"policy": policy}, optimizer, {"train": generator}, rounds,
                    {"config": _jsonable(config), "memo": memo, "screened": screened})


def _jsonable(config: ExpertConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _restore(out: Path, resume: bool, config: ExpertConfig, policy, optimizer, generator):
    """``(first round, log, memo, screened)``: a resumed run's, or ``(0, [], empty, empty)`` for a new one."""
    settings = len(config.steps) * len(config.shifts)
    if not (out / CHECKPOINT).exists():
        return 0, [], [{} for _ in range(settings)], [{} for _ in range(settings)]
    if not resume:
        raise RecacheError(f"{out} already holds a training run; resume it (--resume) or choose another --out")
    rounds, extra = load_checkpoint(out / CHECKPOINT, {"policy": policy}, optimizer, {"train": generator})
    if extra.get("config") != _jsonable(config):
        raise RecacheError(f"{out} was trained with other settings ({extra.get('config')}); resume with the same ones")
    if not is_whole(rounds, 0, config.rounds):
        raise RecacheError(f"checkpoint {out / CHECKPOINT} holds {rounds} rounds, not 0-{config.rounds}")
    try:
        memo, screened = ([{tuple(int(s) for s in steps): float(loss) for steps, loss in setting} for setting in part]
                          for part in (extra["memo"], extra.get("screened", [[]] * settings)))
        if len(memo) != settings or len(screened) != settings:
            raise ValueError(f"{len(memo)} and {len(screened)} settings, not {settings}")
    except (KeyError, TypeError, ValueError) as e:
        raise RecacheError(f"checkpoint {out / CHECKPOINT} has a damaged memo ({e}); "
                           "delete it to start afresh") from None
    logged = read_jsonl(out / LOG, "training log") if (out / LOG).exists() else []
    return rounds, [row for row in logged if is_whole(row.get("round"), 0, rounds - 1)], memo, screened


def guard_settings(policy: NoiseLevelPolicy, settings: list[_Setting], config: ExpertConfig, out: Path,
                   progress: bool = True) -> tuple[list[dict], list[dict]]:
    """The (T, shift, k) whose learned schedule does not beat uniform in MSE on ``GUARD_PAIRS`` fresh calibration
    pairs (seeds ``pairs .. pairs + GUARD_PAIRS - 1``), and every (T, shift, k) with its ratio learned / uniform
    (what the policy's schedules between trained settings check). Writes ``guard.json``."""
    classes, seeds = calibration_pairs(GUARD_PAIRS, offset=config.pairs, num_conditions=settings[0].pipe.num_conditions)
    mechanism, fallback, report, ratios = get_mechanism(config.mechanism), [], [], []
    for s in tqdm(settings, desc="guard", disable=not progress):
        objective = rollout_objective(s.pipe, mechanism, classes, seeds, s.pipe(classes, seeds))
        budgets = policy.config.budgets(s.T)
        learned = [tuple(policy.schedule(k, sigmas=s.sigmas, guarded=False).steps) for k in budgets]
        uniform = [tuple(Schedule.uniform(s.T, k).steps) for k in budgets]
        losses = objective(learned + uniform)
        for k, mine, theirs in zip(budgets, losses, losses[len(learned):], strict=False):
            entry = {"T": s.T, "shift": s.shift, "k": k}
            report.append({**entry, "learned_loss": mine, "uniform_loss": theirs, "fallback": mine >= theirs})
            fallback += [entry] if mine >= theirs else []
            ratios.append({**entry, "ratio": round(mine / max(theirs, 1e-30), 6)})
    write_json(out / GUARD, {"pairs": GUARD_PAIRS, "seeds": [config.pairs, config.pairs + GUARD_PAIRS - 1],
                             "settings": report})
    return fallback, ratios
