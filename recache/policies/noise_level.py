"""ReCache v2: a schedule policy that sees noise levels, so one policy serves any step count T and sigma grid.

``pi(S | k, sigma)``: one small MLP scores every candidate step ``u = 1..T-1`` from what the sampler knows about it,
``f(u) = [sigma_u, u/T, T (sigma_{u-1} - sigma_u), T (sigma_u - sigma_{u+1}), 10/T, k/T]`` plus octave features
``sin/cos(pi 2^j sigma_u)`` and ``sin/cos(pi 2^j u/T)``, ``j = 0..5`` (NeRF's positional encoding: the finest
resolves about two steps of 50, which a policy that places single steps needs; with four linear frequencies the
network could not reproduce the schedules it was taught), and ``sin/cos(2 pi j k/T)``, ``j = 1..8``. A schedule is
step 0 and the top-(k-1) scores (Plackett-Luce / Gumbel-top-k when sampled, as v1), so it has exactly k full passes
on any grid. v1 (``recache.py``) maps the budget alone to T-1 logits, so it is tied to one T and one grid.

The config says what the policy was trained on: the settings (step count ``T`` and time-shifted grid ``shift``, with
``linear = 1``; ``fit_shift`` recognises a grid by its values, FLUX's resolution-dependent shift included) and the
budget fractions ``k/T``. Between the trained settings the network's own scores were measured worse than uniform
at most budgets, so there the schedule is interpolated by noise level from the trained settings around it
(``_between``); outside them a setting is refused with one line unless extrapolation is allowed
(``check_setting``). The guard (``fallback``, ``guard_ratios``) is per trained setting ``(T, shift, k)``.
Everything here is ours: the paper conditions its policy on the budget only and publishes no network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recache.errors import RecacheError, is_whole
from recache.io import check_fields
from recache.mechanisms import MECHANISMS
from recache.policies.pretrained import load_policy_weights, read_policy_config, resolve_policy, write_policy
from recache.policies.recache import MAX_HIDDEN, ReCachePolicy, SchedulePolicy, policy_mlp
from recache.sampling.sigmas import GRID_FIT_TOLERANCE, fit_shift, get_sigmas
from recache.schedule import Schedule, check_budget, steps_at_noise_levels

KIND = "recache-v2"
OCTAVES, BUDGET_FREQUENCIES = 6, 8
FEATURES = 6 + 4 * OCTAVES + 2 * BUDGET_FREQUENCIES
SHIFT_MATCH = 1e-3  # relative: a grid whose fitted shift is this close to a trained one is that grid
TRANSFER_RATIO = 0.7  # between trained settings, the neighbours' learned / uniform guard MSE must be at most this
TRANSFER_FRACTION = 0.4  # and the budget at most this fraction k/T of the steps


def grid_name(shift: float) -> str:
    return "linear" if abs(shift - 1) < SHIFT_MATCH else f"shifted:{shift:g}"


@dataclass(frozen=True)
class NoiseLevelConfig:
    """What a v2 policy is for (model, mechanism, the settings it was trained on and their range) and how."""

    settings: list = field(default_factory=lambda: [{"T": 50, "shift": 1.0}])  # trained (T, grid shift) pairs
    k_fraction: list = field(default_factory=lambda: [0.08, 0.5])  # trained budgets: k/T in this range
    hidden: int = 128
    model: str = "mnist-dit"
    mechanism: str = "taylorseer"
    sigmas: str = "linear"  # the grid of ``schedule_for_steps`` (callers that give only T: the hooks)
    training: dict = field(default_factory=dict)
    fallback: list = field(default_factory=list)  # {"T", "shift", "k"}: learned lost to uniform on calibration
    guard_ratios: list = field(default_factory=list)  # {"T", "shift", "k", "ratio"}: learned / uniform guard MSE

    def __post_init__(self):
        if not (isinstance(self.settings, list) and self.settings and all(_is_setting(s) for s in self.settings)):
            raise RecacheError(f"settings must list trained {{'T': steps, 'shift': grid shift}}, got "
                               f"{str(self.settings)[:200]}")
        lo, hi = self.k_fraction if isinstance(self.k_fraction, list) and len(self.k_fraction) == 2 else (-1, -1)
        if not (isinstance(lo, float | int) and isinstance(hi, float | int) and 0 < lo <= hi <= 1):
            raise RecacheError(f"k_fraction must be [low, high] within (0, 1], got {self.k_fraction!r}")
        if not is_whole(self.hidden, 1, MAX_HIDDEN):
            raise RecacheError(f"hidden width must be a whole number from 1 to {MAX_HIDDEN}, got {self.hidden!r}")
        if self.mechanism not in MECHANISMS:
            raise RecacheError(f"mechanism {self.mechanism!r} is unknown; one of {', '.join(MECHANISMS)}")
        for name in ("model", "sigmas"):
            if not isinstance(getattr(self, name), str):
                raise RecacheError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.training, dict):
            raise RecacheError(f"training must be an object of settings, got {self.training!r}")
        if not (isinstance(self.fallback, list) and all(_is_setting(f) and is_whole(f.get("k"), 1) for f in
                                                         self.fallback)):
            raise RecacheError(f"fallback must list {{'T', 'shift', 'k'}} entries, got {str(self.fallback)[:200]}")
        if not (isinstance(self.guard_ratios, list) and all(_is_setting(g) and is_whole(g.get("k"), 1) and
                                                             _is_positive(g.get("ratio"), zero=True)
                                                             for g in self.guard_ratios)):
            raise RecacheError(f"guard_ratios must list {{'T', 'shift', 'k', 'ratio'}} entries, got "
                               f"{str(self.guard_ratios)[:200]}")

    def budgets(self, T: int) -> range:
        """The trained budgets at ``T`` steps: ``k/T`` in ``k_fraction``, at least 2 (one step to place)."""
        lo, hi = self.k_fraction
        return range(max(2, math.ceil(lo * T - 1e-9)), min(T - 1, math.floor(hi * T + 1e-9)) + 1)


def _same_shift(a: float, b: float) -> bool:
    return abs(a - b) <= SHIFT_MATCH * b


def _is_positive(x, zero: bool = False) -> bool:
    return (isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x)
            and (x >= 0 if zero else x > 0))


def _is_setting(s) -> bool:
    return isinstance(s, dict) and is_whole(s.get("T"), 2) and _is_positive(s.get("shift"))


def _bracket(trained: list, x: float, coordinate) -> list[tuple[float, float]]:
    """The trained values either side of ``x`` with their linear weights in ``coordinate(x)``: one of weight 1 when
    ``x`` is trained, none when it is outside."""
    below, above = [v for v in trained if v <= x], [v for v in trained if v >= x]
    if not below or not above:
        return []
    lo, hi = max(below), min(above)
    if lo == hi:
        return [(lo, 1.0)]
    w = (coordinate(x) - coordinate(lo)) / (coordinate(hi) - coordinate(lo))
    return [(lo, 1 - w), (hi, w)]


def step_features(sigmas: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(len(k), T - 1, FEATURES)``: the features of candidate steps ``1..T-1`` of grid ``sigmas`` (T + 1 values)
    for each budget in ``k`` (module docstring)."""
    sigmas = sigmas.float()
    T = len(sigmas) - 1
    u = torch.arange(1, T, dtype=torch.float32)
    sigma, before, after = sigmas[1:T], T * (sigmas[:T - 1] - sigmas[1:T]), T * (sigmas[1:T] - sigmas[2:])
    octaves = math.pi * 2.0 ** torch.arange(OCTAVES, dtype=torch.float32)
    angles = torch.cat([octaves * sigma[:, None], octaves * (u / T)[:, None]], 1)
    per_step = torch.cat([torch.stack([sigma, u / T, before, after, torch.full_like(u, 10 / T)], 1),
                          torch.sin(angles), torch.cos(angles)], 1)
    fraction = k.float()[:, None] / T
    angles = 2 * math.pi * torch.arange(1, BUDGET_FREQUENCIES + 1, dtype=torch.float32) * fraction
    per_budget = torch.cat([fraction, torch.sin(angles), torch.cos(angles)], 1)
    return torch.cat([per_step[None].expand(len(k), -1, -1), per_budget[:, None].expand(-1, T - 1, -1)], 2)


class NoiseLevelPolicy(SchedulePolicy):
    """``logits(k, sigmas)`` over the candidate steps; ``sample`` for training, ``schedule(k, sigmas)`` to use."""

    def __init__(self, config: NoiseLevelConfig):
        super().__init__(config)
        self.mlp = policy_mlp(FEATURES, config.hidden, 1)

    def logits(self, k: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Logits ``(len(k), T - 1)`` of steps 1..T-1 on grid ``sigmas``."""
        return self.mlp(step_features(sigmas, k)).squeeze(-1)

    def sample(self, k: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """One schedule per budget by Gumbel-top-k on ``logits / temperature``: compute masks ``(len(k), T)``."""
        logits = self.logits(k, sigmas).detach() / temperature
        u = torch.rand(logits.shape, generator=generator).clamp_min(1e-12)
        order = (logits - torch.log(-torch.log(u))).argsort(dim=1, descending=True)
        masks = torch.zeros(len(k), logits.shape[1] + 1, dtype=torch.bool)
        masks[:, 0] = True
        masks[:, 1:].scatter_(1, order, torch.arange(logits.shape[1])[None] < (k[:, None] - 1))
        return masks

    def log_likelihood(self, masks: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Log-probability of the step sets in ``masks`` (n, T), each taken as its steps in logit order (the most
        likely ordering of the set; ours: the distillation target of ``expert_iteration``)."""
        k = masks.sum(1)
        logits = self.logits(k, sigmas)
        key = logits.detach() + 1e4 * masks[:, 1:].float()  # the set first, in logit order, then the rest
        order = key.argsort(dim=1, descending=True)
        return ReCachePolicy.log_prob(logits, order, k)

    def check_setting(self, k: int, sigmas: torch.Tensor, allow_extrapolate: bool = False) -> float:
        """The fitted shift of ``sigmas``, after checking that (T, grid) lies in the trained range (T and shift each
        between the trained ones, the four settings around it trained) and k/T in the trained fractions."""
        T = len(sigmas) - 1
        check_budget(k, T)
        shift, gap = fit_shift(sigmas)
        if allow_extrapolate:
            return shift
        steps = sorted({s["T"] for s in self.config.settings})
        shifts = sorted({s["shift"] for s in self.config.settings})
        trained = (f"the policy was trained on T {', '.join(map(str, steps))} with time-shifted grids of shift "
                   f"{', '.join(f'{x:g}' for x in shifts)} (and plans between them) and k/T "
                   f"{self.config.k_fraction[0]:g}-{self.config.k_fraction[1]:g}")
        if gap > GRID_FIT_TOLERANCE:
            raise RecacheError(f"this sigma grid is not a time-shifted one (it is {gap:.3f} from the nearest); "
                               f"{trained}; allow extrapolation (--allow-extrapolate) to use it anyway")
        problems = [f"T={T}"] if not steps[0] <= T <= steps[-1] else []
        inside = shifts[0] * (1 - SHIFT_MATCH) <= shift <= shifts[-1] * (1 + SHIFT_MATCH)
        problems += [f"a grid of shift {shift:.3g}"] if not inside else []
        if not problems and not self._corners(T, shift):
            problems = [f"T={T} with a grid of shift {shift:.3g}"]  # a setting around it was not trained
        problems += [f"budget k={k} (k/T = {k / T:.3g})"] if k not in self.config.budgets(T) else []
        if problems:
            raise RecacheError(f"{' and '.join(problems)} is outside the trained range: {trained}; use a setting in "
                               "that range or allow extrapolation (--allow-extrapolate)")
        return shift

    def _corners(self, T: int, shift: float) -> list[tuple[int, float, float]]:
        """The trained settings ``(T', shift', weight)`` around ``(T, shift)``, bilinear in ``(1/T, log shift)``: one
        of weight 1 on a trained setting, none outside the trained range or where one of them was not trained."""
        shifts = sorted({float(s["shift"]) for s in self.config.settings})
        shift = next((x for x in shifts if _same_shift(shift, x)), shift)
        corners = [(t, x, wt * wx) for t, wt in _bracket(sorted({s["T"] for s in self.config.settings}), T,
                                                          lambda v: 1 / v)
                   for x, wx in _bracket(shifts, shift, math.log)]
        trained = {(s["T"], float(s["shift"])) for s in self.config.settings}
        return corners if all((t, x) in trained for t, x, _ in corners) else []

    def covers(self, k: int, sigmas: torch.Tensor) -> bool:
        """Whether budget ``k`` on grid ``sigmas`` is in the trained range."""
        try:
            self.check_setting(k, sigmas)
        except RecacheError:
            return False
        return True

    @property
    def training_rollouts(self) -> int | None:
        """The cached rollouts (schedules x calibration pairs) its training ran, as the config records them."""
        return self.config.training.get("rollouts")

    @torch.no_grad()
    def schedule(self, k: int, nested: bool = False, allow_extrapolate: bool = False, guarded: bool = True,
                 sigmas: torch.Tensor | None = None) -> Schedule:
        """The deterministic schedule of ``k`` full passes on grid ``sigmas`` (default: the config's grid at the first
        trained T). On a trained setting: step 0 and the top-(k-1) logits, or the uniform one where the guard found
        the learned schedule worse on calibration pairs (metadata ``fallback``). Between trained settings: the
        neighbours' schedules interpolated by noise level (``_between``). Outside the range (extrapolation allowed):
        the top logits, unchecked. Metadata ``guard`` says which: learned, uniform, interpolated or not checked."""
        if nested:
            raise RecacheError("nested schedules are a v1 option; this is a v2 (noise-level) policy")
        sigmas = get_sigmas(self.config.sigmas, self.config.settings[0]["T"]) if sigmas is None else sigmas
        shift, T = self.check_setting(k, sigmas, allow_extrapolate), len(sigmas) - 1
        corners = self._corners(T, shift) if k in self.config.budgets(T) else []
        if len(corners) > 1:
            steps, guard = self._between(k, sigmas, corners, guarded)
        else:
            guard = ("uniform" if self._fell_back(T, shift, k) else "learned") if corners else "not checked"
            steps = None if guarded and guard == "uniform" else self._top_steps(k, sigmas)
        meta = {"source": "recache", "policy": KIND, "model": self.model, "mechanism": self.mechanism,
                "sigmas": grid_name(shift), "guard": guard}
        if k == 1:
            return Schedule.uniform(T, 1).with_metadata(**meta)
        if steps is None:
            return Schedule.uniform(T, k).with_metadata(**meta, fallback="uniform")
        return Schedule.from_steps(T, steps, **meta)

    def _top_steps(self, k: int, sigmas: torch.Tensor) -> list[int]:
        return [0, *sorted((self.logits(torch.tensor([k]), sigmas)[0].topk(k - 1).indices + 1).tolist())]

    def _step_sigmas(self, k: int, sigmas: torch.Tensor) -> torch.Tensor:
        """The noise levels of the computed steps of a trained setting's schedule, from the highest."""
        return sigmas.double()[self._top_steps(k, sigmas)]

    def _between(self, k: int, sigmas: torch.Tensor, corners: list, guarded: bool) -> tuple[list[int] | None, str]:
        """Budget ``k`` between trained settings (ours, measured on calibration pairs, docs/recache.md): the
        computed steps' noise levels of the four trained settings around it (same k, each on its own grid),
        averaged with the bilinear weights of ``_corners``, each placed on the nearest step of ``sigmas``
        (``steps_at_noise_levels``). The guard keeps uniform unless every one of those settings has k
        in its range and its learned schedule beat uniform clearly (guard MSE ratio <= ``TRANSFER_RATIO``), and the
        budget is at most ``TRANSFER_FRACTION`` of the steps: above it uniform is close to the best schedules, whose
        small gains are particular to their own grid and were lost or reversed by the average (development pairs)."""
        usable = [(t, x, w) for t, x, w in corners if k in self.config.budgets(t)]
        doubtful = (len(usable) < len(corners) or k > TRANSFER_FRACTION * (len(sigmas) - 1)
                    or any(self._guard_ratio(t, x, k) > TRANSFER_RATIO for t, x, _ in usable))
        if not usable or (guarded and doubtful):
            return None, "uniform"
        target = sum(w * self._step_sigmas(k, get_sigmas(grid_name(x), t)) for t, x, w in usable)
        return steps_at_noise_levels(target / sum(w for *_, w in usable), sigmas), "interpolated"

    def _fell_back(self, T: int, shift: float, k: int) -> bool:
        return any(f["T"] == T and _same_shift(shift, f["shift"]) and f["k"] == k for f in self.config.fallback)

    def _guard_ratio(self, T: int, shift: float, k: int) -> float:
        """The trained setting's learned / uniform MSE on the guard pairs: infinite where the guard fell back, 0 when
        not recorded (a policy trained before the ratios were kept)."""
        if self._fell_back(T, shift, k):
            return math.inf
        return next((g["ratio"] for g in self.config.guard_ratios
                     if g["T"] == T and _same_shift(shift, g["shift"]) and g["k"] == k), 0.0)

    def schedule_for_steps(self, k: int, T: int, allow_extrapolate: bool = False,
                           sigmas: torch.Tensor | None = None) -> Schedule:
        """The schedule for ``T`` steps on the sampler's grid ``sigmas`` (what the hooks ask for; the pipeline's
        scheduler tells it), or on the config's grid when the sampler does not say."""
        if sigmas is None:
            sigmas = get_sigmas(self.config.sigmas, T)
        elif len(sigmas) != T + 1:
            raise RecacheError(f"a grid of T={T} steps has {T + 1} sigmas, got {len(sigmas)}")
        return self.schedule(k, sigmas=sigmas, allow_extrapolate=allow_extrapolate)

    def save_pretrained(self, folder: str | Path) -> None:
        write_policy(folder, self.state_dict(), {"policy": KIND, **asdict(self.config)})

    @classmethod
    def from_config(cls, folder: Path, raw: dict) -> NoiseLevelPolicy:
        try:
            check_fields(raw, NoiseLevelConfig, "the file", optional=("guard_ratios",))  # older v2 policies
            config = NoiseLevelConfig(**raw)
        except (ValueError, TypeError) as e:
            raise RecacheError(f"{folder}/config.json is not a valid ReCache v2 policy config ({e})") from None
        policy = cls(config)
        load_policy_weights(policy, folder)
        return policy.eval()


def load_policy(name_or_folder: str | Path, T: int | None = None, model: str | None = None,
                mechanism: str | None = None, sigmas: str | None = None) -> ReCachePolicy | NoiseLevelPolicy:
    """A policy folder (or shipped name) of either version: v1 (``ReCachePolicy``, one T and grid; ``T`` and
    ``sigmas`` must match) or v2 (``NoiseLevelPolicy``, whose range is checked per schedule). ``model`` and
    ``mechanism``, when given, must match."""
    folder = resolve_policy(name_or_folder)
    raw = read_policy_config(folder)
    if raw.get("policy") != KIND:
        return ReCachePolicy.from_pretrained(folder, T=T, model=model, mechanism=mechanism, sigmas=sigmas)
    raw.pop("policy")
    policy = NoiseLevelPolicy.from_config(folder, raw)
    for what, want, have in (("model", model, policy.model), ("mechanism", mechanism, policy.mechanism)):
        if want is not None and want != have:
            raise RecacheError(f"policy {folder} was trained for {what} = {have}, not {want}")
    return policy
