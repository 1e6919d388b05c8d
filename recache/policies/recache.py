"""ReCache: one budget-conditioned schedule policy (Aliev et al. 2026, arXiv 2606.06060).

``pi(S | k)``: a small MLP maps the budget embedding ``e(k) = [k/T, sin(2 pi j k/T), cos(2 pi j k/T), j = 1..4]`` to
one logit per step. A k-subset is drawn by Gumbel-top-k, i.e. Plackett-Luce without replacement (Kool et al.
2019): keys ``l_u + g_u`` over the candidates ``u = 1..T-1`` (step 0 is always computed), the schedule is step 0 and
the first ``k - 1`` of the keys' descending order ``o``, and the score function is the log-probability of that
ordering, ``sum_{j<k-1} [l_{o_j} - logsumexp(l_{o_j}, ..., l_{o_{T-1}})]``. At inference the schedule is the
deterministic top-(k-1). The MLP size, the embedding and the zero-initialised last layer (training starts from
the uniform distribution) are our choices; the paper does not publish them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from recache.errors import RecacheError, is_whole
from recache.io import check_fields
from recache.mechanisms import MECHANISMS
from recache.policies.pretrained import load_policy_weights, read_policy_config, resolve_policy, write_policy
from recache.sampling.sigmas import get_sigmas
from recache.schedule import Schedule, check_budget

FREQUENCIES = 4
MAX_HIDDEN = 4096  # a policy is a small MLP; wider is a damaged config, not a policy


@dataclass(frozen=True)
class ReCacheConfig:
    """What a policy is for (model, sigma grid, mechanism, T, budget range) and how it was trained."""

    T: int = 50
    k_min: int = 4
    k_max: int = 25
    hidden: int = 128
    model: str = "mnist-dit"
    sigmas: str = "linear"
    mechanism: str = "taylorseer"
    training: dict = field(default_factory=dict)  # reward, alpha, updates, seeds hash, library version, ...
    fallback: list = field(default_factory=list)  # budgets whose learned schedule lost to uniform on calibration pairs
    step_mapping: str = "nearest"  # how a schedule for another number of steps is made: ``schedule_for_steps``

    def __post_init__(self):
        check_budget(self.k_min, self.T)
        check_budget(self.k_max, self.T)
        if self.k_min > self.k_max:
            raise RecacheError(f"budget range {self.k_min}-{self.k_max} is empty")
        if not is_whole(self.hidden, 1, MAX_HIDDEN):
            raise RecacheError(f"hidden width must be a whole number from 1 to {MAX_HIDDEN}, got {self.hidden!r}")
        for name in ("model", "sigmas", "mechanism"):
            if not isinstance(getattr(self, name), str):
                raise RecacheError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.mechanism not in MECHANISMS:
            raise RecacheError(f"mechanism {self.mechanism!r} is unknown; one of {', '.join(MECHANISMS)}")
        if self.step_mapping != "nearest":
            raise RecacheError(f"step_mapping {self.step_mapping!r} is unknown; the one there is: 'nearest'")
        if not isinstance(self.training, dict):
            raise RecacheError(f"training must be an object of settings, got {self.training!r}")
        if self.training.get("mechanism", self.mechanism) != self.mechanism:
            raise RecacheError(f"the config's mechanism {self.mechanism!r} is not the one it was trained with "
                               f"(training.mechanism {str(self.training['mechanism'])[:100]!r})")
        if not isinstance(self.fallback, list) or not all(is_whole(k, self.k_min, self.k_max) for k in self.fallback):
            raise RecacheError(f"fallback must list budgets within {self.k_min}-{self.k_max}, got {self.fallback!r}")


def policy_mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """The policies' network: two SiLU layers of ``hidden``, the last layer zero-initialised, so training starts
    from the uniform distribution (maximum entropy). Ours."""
    mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, outputs))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class SchedulePolicy(nn.Module):
    """What every learned policy says of itself: its config and the model and mechanism it was trained for."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def mechanism(self) -> str:
        return self.config.mechanism


class ReCachePolicy(SchedulePolicy):
    """``logits(k)`` over the T steps; ``sample`` for training, ``schedule(k)`` for inference."""

    def __init__(self, config: ReCacheConfig):
        super().__init__(config)
        self.mlp = policy_mlp(1 + 2 * FREQUENCIES, config.hidden, config.T - 1)

    @property
    def T(self) -> int:
        return self.config.T

    def budget_embedding(self, k: torch.Tensor) -> torch.Tensor:
        u = k.float()[:, None] / self.T
        j = torch.arange(1, FREQUENCIES + 1, dtype=torch.float32)
        return torch.cat([u, torch.sin(2 * math.pi * j * u), torch.cos(2 * math.pi * j * u)], dim=1)

    def logits(self, k: torch.Tensor) -> torch.Tensor:
        """Logits (n, T - 1) of the candidate steps 1..T-1 for budgets ``k`` (n,)."""
        return self.mlp(self.budget_embedding(k))

    def sample(self, k: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one schedule per budget by Gumbel-top-k: compute masks (n, T) and log-probabilities (n,) of the
        sampled orderings (differentiable in the policy's parameters)."""
        logits = self.logits(k)
        u = torch.rand(logits.shape, generator=generator).clamp_min(1e-12)
        order = (logits.detach() - torch.log(-torch.log(u))).argsort(dim=1, descending=True)
        chosen = torch.arange(self.T - 1)[None] < (k[:, None] - 1)
        masks = torch.zeros(len(k), self.T, dtype=torch.bool)
        masks[:, 0] = True
        masks[:, 1:].scatter_(1, order, chosen)
        return masks, self.log_prob(logits, order, k)

    @staticmethod
    def log_prob(logits: torch.Tensor, order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Plackett-Luce log-probability of the first ``k - 1`` entries of each ordering."""
        ranked = logits.gather(1, order)
        tail = ranked.flip(1).logcumsumexp(1).flip(1)
        chosen = torch.arange(order.shape[1])[None] < (k[:, None] - 1)
        return ((ranked - tail) * chosen).sum(1)

    def entropy(self, k: torch.Tensor) -> torch.Tensor:
        """Entropy of the softmax over the candidates (the first Plackett-Luce draw), per budget."""
        logp = self.logits(k).log_softmax(1)
        return -(logp.exp() * logp).sum(1)

    def check_budget(self, k: int, allow_extrapolate: bool = False) -> None:
        check_budget(k, self.T)
        lo, hi = self.config.k_min, self.config.k_max
        if not (allow_extrapolate or lo <= k <= hi):
            raise RecacheError(f"budget {k} is outside the policy's trained range {lo}-{hi}; use a budget in that "
                               "range or allow extrapolation (--allow-extrapolate)")

    @torch.no_grad()
    def schedule_for_steps(self, k: int, T: int, allow_extrapolate: bool = False,
                           sigmas: torch.Tensor | None = None) -> Schedule:
        """The schedule of ``k`` full passes on a sampler of ``T`` steps, which may differ from the trained ``T_p``;
        at ``T = T_p`` the sampler's grid ``sigmas``, when given, is checked against the trained one.

        Mapping (``step_mapping = "nearest"`` in the saved config; our choice, in the spirit of MagCache's nearest
        interpolation of its ratios): the policy is asked for the budget with the same compute fraction,
        ``k_p = round(k T_p / T)``, which must lie in the trained range; its steps, best logit first, are sent to the
        nearest step of the new grid, ``round(s (T - 1) / (T_p - 1))``, and the first ``k - 1`` distinct ones are kept
        (when ``T > T_p`` leaves too few, the rest come from the logits interpolated linearly in normalised time). A
        budget the calibration guard sent to uniform stays uniform. At ``T = T_p`` this is ``schedule(k)``."""
        check_budget(k, T)
        if k == 1:  # nothing to place
            return Schedule.uniform(T, 1).with_metadata(source="recache", model=self.config.model,
                                                        mechanism=self.config.mechanism)
        if T == self.T:
            return self.schedule(k, allow_extrapolate=allow_extrapolate, sigmas=sigmas)
        k_p = min(max(round(k * self.T / T), 2), self.T)
        if not (allow_extrapolate or self.config.k_min <= k_p <= self.config.k_max):
            raise RecacheError(f"budget k={k} of T={T} steps is k={k_p} of the policy's T={self.T}, "
                               f"outside its trained range {self.config.k_min}-{self.config.k_max}; "
                               "use a budget in that range or allow extrapolation")
        meta = {"source": "recache", "model": self.config.model, "mechanism": self.config.mechanism,
                "mapped_from_T": self.T, "mapped_from_k": k_p}
        if k_p in self.config.fallback:
            return Schedule.uniform(T, k).with_metadata(**meta, fallback="uniform")
        logits = self.logits(torch.tensor([k_p]))[0]  # steps 1..T_p-1
        nearest = [round(int(s + 1) * (T - 1) / (self.T - 1)) for s in logits.argsort(descending=True)]
        steps = [s for s in dict.fromkeys(nearest) if s > 0][: k - 1]
        if len(steps) < k - 1:
            x = (torch.arange(1, T) * (self.T - 1) / (T - 1)).clamp(1, self.T - 1) - 1  # fractional index into logits
            below = x.floor().long()
            mapped = torch.lerp(logits[below], logits[(below + 1).clamp(max=len(logits) - 1)], x - below)
            mapped[torch.tensor(steps, dtype=torch.long) - 1] = -math.inf
            steps += (mapped.topk(k - 1 - len(steps)).indices + 1).tolist()
        return Schedule.from_steps(T, [0, *steps], **meta)

    def covers(self, k: int, sigmas: torch.Tensor | None = None) -> bool:
        """Whether budget ``k`` (on grid ``sigmas``) is in the trained range."""
        return self.config.k_min <= k <= self.config.k_max and (sigmas is None or len(sigmas) - 1 == self.T)

    @property
    def training_rollouts(self) -> int | None:
        """The cached rollouts its training ran (updates x pairs x group), when the config records them."""
        t = self.config.training
        return t["updates"] * t["pairs"] * t["group"] if {"updates", "pairs", "group"} <= set(t) else None

    def check_grid(self, sigmas: torch.Tensor) -> None:
        """``sigmas`` must be the grid the policy was trained on: its T, and its values when ``config.sigmas`` names
        a grid of ``get_sigmas`` (a policy trained on a diffusers pipeline records the scheduler's class instead)."""
        if len(sigmas) - 1 != self.T:
            raise RecacheError(f"the policy was trained for T={self.T} steps, this sampler runs {len(sigmas) - 1}; "
                               "a v1 policy serves one T (a v2 policy, recache train, serves a range)")
        try:
            trained = get_sigmas(self.config.sigmas, self.T)
        except RecacheError:
            return
        if not torch.allclose(trained, torch.as_tensor(sigmas, dtype=trained.dtype), atol=1e-4):
            raise RecacheError(f"the policy was trained on the {self.config.sigmas!r} sigma grid, this sampler's grid "
                               "differs; use that grid, or allow extrapolation (--allow-extrapolate)")

    @torch.no_grad()
    def schedule(self, k: int, nested: bool = False, allow_extrapolate: bool = False, guarded: bool = True,
                 sigmas: torch.Tensor | None = None) -> Schedule:
        """The deterministic schedule for budget ``k``: step 0 and the top-(k-1) logits, or the uniform schedule for
        the budgets in ``config.fallback`` (where the learned one lost to it on calibration pairs; ``guarded=False``
        ignores them). ``sigmas``, when given, is the sampler's grid, checked against the trained one unless
        extrapolation is allowed.

        ``nested=True`` builds the budgets greedily from ``k_min`` up (each adds its best step not yet taken), so
        ``S(k)`` is inside ``S(k + 1)`` by construction, without fallbacks; below ``k_min`` it keeps the top of
        ``S(k_min)``'s logits."""
        self.check_budget(k, allow_extrapolate)
        if sigmas is not None and not allow_extrapolate:
            self.check_grid(sigmas)
        meta = {"source": "recache", "model": self.config.model, "mechanism": self.config.mechanism,
                "sigmas": self.config.sigmas, "nested": nested}
        if guarded and not nested and k in self.config.fallback:
            return Schedule.uniform(self.T, k).with_metadata(**meta, fallback="uniform")
        steps = (self._nested_steps(k) if nested
                 else (self.logits(torch.tensor([k]))[0].topk(k - 1).indices + 1).tolist())
        return Schedule.from_steps(self.T, [0, *steps], **meta)

    def _nested_steps(self, k: int) -> list[int]:
        start = min(k, self.config.k_min)
        steps = (self.logits(torch.tensor([start]))[0].topk(start - 1).indices + 1).tolist()
        for budget in range(start + 1, k + 1):
            logits = self.logits(torch.tensor([budget]))[0].clone()
            logits[torch.tensor(steps, dtype=torch.long) - 1] = -math.inf
            steps.append(int(logits.argmax()) + 1)
        return steps

    def nested_budgets(self) -> list[int]:
        """Budgets ``k`` in the trained range whose learned top-k ``S(k)`` is not inside ``S(k + 1)`` (fallbacks
        ignored)."""
        lo, hi = self.config.k_min, self.config.k_max
        sets = {k: set(self.schedule(k, guarded=False).steps) for k in range(lo, hi + 1)}
        return [k for k in range(lo, hi) if not sets[k] <= sets[k + 1]]

    def save_pretrained(self, folder: str | Path) -> None:
        """``model.safetensors`` and ``config.json`` (each written atomically)."""
        write_policy(folder, self.state_dict(), {"policy": "recache", **asdict(self.config)})

    @classmethod
    def from_pretrained(cls, folder: str | Path, T: int | None = None, model: str | None = None,
                        mechanism: str | None = None, sigmas: str | None = None) -> ReCachePolicy:
        """Load a policy (a folder or a shipped name); ``T``, ``model``, ``mechanism`` and ``sigmas`` (the sigma
        grid's name), when given, must match what it was trained for."""
        folder = resolve_policy(folder)
        raw = read_policy_config(folder)
        try:
            if raw.pop("policy", None) != "recache":
                raise ValueError("not a ReCache policy config")
            check_fields(raw, ReCacheConfig, "the file", optional=("step_mapping",))  # older policies: "nearest"
            config = ReCacheConfig(**raw)
        except (ValueError, TypeError) as e:
            raise RecacheError(f"{folder}/config.json is not a valid ReCache policy config ({e})") from None
        for what, want, have in (("T", T, config.T), ("model", model, config.model),
                                 ("mechanism", mechanism, config.mechanism)):
            if want is not None and want != have:
                raise RecacheError(f"policy {folder} was trained for {what} = {have}, not {want}")
        if sigmas is not None and sigmas != config.sigmas:
            raise RecacheError(f"policy {folder} was trained on the {config.sigmas!r} sigma grid, not {sigmas!r}; use "
                               "that grid, or allow it on this one (--allow-extrapolate)")
        policy = cls(config)
        load_policy_weights(policy, folder)
        return policy.eval()
