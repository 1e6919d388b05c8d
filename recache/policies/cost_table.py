"""The cost table of path planning: the output error each cached segment causes, measured on calibration pairs.

Edge ``(i, j)``, ``0 <= i < j <= T`` (LeMiCa's edge, arXiv 2511.00090): steps ``i`` and ``j`` computed, ``i+1 .. j-1``
cached, every other step computed (``j = T``: cached from ``i + 1`` to the end). Its cost is the MSE of the final
output to the uncached one from the same noise and condition, averaged over the calibration pairs: BudCache's
objective, measured by the same batched rollouts as the search (``rollout_objective``). An edge that caches nothing
(``j = i + 1``) costs 0. ``T (T - 1) / 2`` rollouts per pair (1,225 at ``T = 50``). Ours: MSE rather than LeMiCa's L1,
calibration seeds ``0..pairs-1``.

The table is a safetensors file (``cost`` and ``measured``, both ``(T+1, T+1)``) whose JSON metadata records what it
was measured on (model, ``T``, sigma grid, guidance, mechanism, pairs); it is rewritten atomically after every chunk
of rollouts, so a run stopped at any point resumes (``resume=True``) without repeating the edges it measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from recache import distributed
from recache.errors import RecacheError, is_whole
from recache.io import check_regular, folder_lock, remove_stale_temporaries, write_safetensors
from recache.mechanisms import get_mechanism
from recache.policies.budcache import rollout_objective
from recache.policies.path_planning import check_objective, plan_schedules
from recache.protocol import calibration_pairs
from recache.sampling.interface import Sampler, sampler_identity
from recache.schedule import Schedule, check_budget

TABLE = "costs.safetensors"
TABLE_PAIRS = 4  # calibration pairs of a cost table by default: 1,225 rollouts each at T = 50
GUARD_PAIRS = 16  # fresh calibration pairs on which each plan must beat the uniform schedule
FORMAT = "recache-cost-table/1"


def segment_count(T: int) -> int:
    """The edges that cache something, ``(i, j)`` with ``j >= i + 2``: one rollout each per pair."""
    return T * (T - 1) // 2


def segment_steps(T: int, i: int, j: int) -> tuple[int, ...]:
    """The computed steps of edge ``(i, j)``: all but ``i+1 .. j-1``."""
    return (*range(i + 1), *range(j, T))


def table_identity(pipe: Sampler, mechanism: str, pairs: int) -> dict:
    return {**sampler_identity(pipe), "mechanism": mechanism, "pairs": pairs}


def load_table(path: str | Path, identity: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(cost, measured, identity)`` of a table file; with ``identity``, a table measured on anything else is refused
    with one line naming the first setting that differs."""
    check_regular(path, "cost table")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["recache"])
            cost, measured = f.get_tensor("cost"), f.get_tensor("measured")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise RecacheError(f"cost table {path} cannot be read ({str(e)[:200]}); it is left as it is") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("identity"), dict):
        raise RecacheError(f"cost table {path} is not a {FORMAT} file; it is left as it is")
    saved, n = meta["identity"], cost.shape[0] if cost.dim() == 2 else -1
    if (not is_whole(saved.get("T"), 1) or cost.shape != (n, n) or measured.shape != (n, n) or n != saved["T"] + 1
            or not cost.is_floating_point() or not torch.isfinite(cost).all() or (cost < 0).any()):
        raise RecacheError(f"cost table {path} is damaged (shapes, T or values); it is left as it is")
    for key, value in (identity or {}).items():
        if saved.get(key) != value:
            raise RecacheError(f"cost table {path} was measured with {key} = {saved.get(key)!r}, this run has "
                               f"{value!r}; use a table of this run's settings or another --out")
    return cost.double(), measured.bool(), saved


def measure_costs(pipe: Sampler, mechanism: str, pairs: int, out: str | Path, resume: bool = False,
                  chunk: int = 64, progress: bool = True) -> torch.Tensor:
    """The ``(T+1, T+1)`` edge costs, measured (or completed, with ``resume``) into ``out/costs.safetensors``.

    Under torchrun each rank rolls out its block of the pairs and the errors are summed over ranks (as in the
    search); only rank 0 writes the file and shows progress."""
    out, main, T = Path(out), distributed.is_main(), pipe.steps
    identity = table_identity(pipe, mechanism, pairs)
    if pairs < distributed.world_size():
        raise RecacheError(f"{pairs} calibration pairs cannot be shared by {distributed.world_size()} ranks; "
                           "use --pairs >= the ranks")
    cost, measured = distributed.on_main(lambda: _previous(out, resume, identity))
    todo = [(i, j) for i in range(T) for j in range(i + 2, T + 1) if not measured[i, j]]
    classes, seeds = calibration_pairs(pairs, num_conditions=pipe.num_conditions)
    mine = distributed.shard(pairs)
    with folder_lock(out, enabled=main):
        if main:
            remove_stale_temporaries(out)
        if not todo:
            return cost
        objective = rollout_objective(pipe, get_mechanism(mechanism), classes[mine], seeds[mine],
                                      pipe(classes[mine], seeds[mine]), chunk=chunk)
        with tqdm(total=len(todo), desc=f"cost table ({mechanism})", disable=not (progress and main)) as bar:
            for start in range(0, len(todo), chunk):
                edges = todo[start:start + chunk]
                for (i, j), loss in zip(edges, objective([segment_steps(T, i, j) for i, j in edges]), strict=True):
                    cost[i, j], measured[i, j] = loss, True
                if main:
                    _save(out / TABLE, cost, measured, identity)
                bar.update(len(edges))
    return cost


def _previous(out: Path, resume: bool, identity: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The table measured so far in ``out`` (resume), or an empty one; a table there without ``resume`` is refused."""
    T = identity["T"]
    empty = (torch.zeros(T + 1, T + 1, dtype=torch.float64), torch.zeros(T + 1, T + 1, dtype=torch.bool))
    if not (out / TABLE).exists():
        return empty
    if not resume:
        raise RecacheError(f"{out} already holds a cost table; resume it (--resume) or choose another --out")
    cost, measured, _ = load_table(out / TABLE, identity)
    return cost, measured


def _save(path: Path, cost: torch.Tensor, measured: torch.Tensor, identity: dict) -> None:
    """Atomically: a write error is one line, and the table measured before stays whole for a resume."""
    write_safetensors(path, {"cost": cost, "measured": measured.to(torch.uint8)},
                      metadata={"recache": json.dumps({"format": FORMAT, "identity": identity})})


def plan_from_calibration(pipe: Sampler, mechanism: str, pairs: int, budgets: list[int], out: str | Path,
                          objective: str = "sum", resume: bool = False, progress: bool = True) -> dict[int, Schedule]:
    """Measure (or complete) the cost table in ``out``, plan every budget on it and guard each plan against the
    uniform schedule on the calibration pairs (``guard_plans``); rank 0 writes one ``schedule-k<k>.json`` per budget
    beside the table. Budgets are checked before any rollout."""
    for k in budgets:
        check_budget(k, pipe.steps)
    check_objective(objective)
    cost = measure_costs(pipe, mechanism, pairs, out, resume=resume, progress=progress)
    plans = plan_schedules(cost, budgets, objective, model=pipe.model_id, mechanism=mechanism,
                           sigmas=pipe.sigma_schedule, calibration_seeds=[0, pairs - 1])
    schedules = guard_plans(pipe, mechanism, pairs, plans)
    if distributed.is_main():
        for k, schedule in schedules.items():
            schedule.save(Path(out) / schedule_name(k))
    return schedules


def guard_plans(pipe: Sampler, mechanism: str, pairs: int, plans: dict[int, Schedule]) -> dict[int, Schedule]:
    """Each plan's true MSE on ``GUARD_PAIRS`` fresh calibration pairs, the ones after the table's (seeds
    ``pairs .. pairs + 15``: a plan fitted to a few pairs can fail on others), beside the uniform schedule's; where the
    plan loses to uniform there, the uniform schedule is kept instead, marked ``fallback = "uniform"`` with the
    plan's steps. Ours, in the spirit of ReCache's calibration guard: segment costs do not always add up, and at very
    small budgets a plan can lose (T = 30, CFG 4, k = 3 here)."""
    classes, seeds = calibration_pairs(GUARD_PAIRS, offset=pairs, num_conditions=pipe.num_conditions)
    mine = distributed.shard(GUARD_PAIRS)
    objective = rollout_objective(pipe, get_mechanism(mechanism), classes[mine], seeds[mine],
                                  pipe(classes[mine], seeds[mine]))
    T, budgets = pipe.steps, list(plans)
    losses = objective([plans[k].steps for k in budgets] + [Schedule.uniform(T, k).steps for k in budgets])
    guarded = {}
    for k, planned, uniform in zip(budgets, losses, losses[len(budgets):], strict=False):
        checked = {"guard_loss": planned, "uniform_loss": uniform, "guard_seeds": [pairs, pairs + GUARD_PAIRS - 1]}
        guarded[k] = (plans[k].with_metadata(**checked) if planned <= uniform else
                      Schedule.uniform(T, k).with_metadata(**{**plans[k].metadata, **checked}, fallback="uniform",
                                                           planned_steps=plans[k].steps))
    return guarded


def schedule_name(k: int) -> str:
    return f"schedule-k{k}.json"
