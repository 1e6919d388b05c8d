"""Budgeted step caching on diffusers transformers through diffusers' hook system (``HookRegistry``).

A hook on the transformer places each call in its generation (``clock.py``: the pipeline's scheduler, the cache
context, or the calls' noise levels), makes the generation's plan for the call's own step count, and decides
whether this step computes (``mask[step] = 1``) or is cached. Hooks on the blocks then run them, or pass their
inputs through; after the blocks the transformer hook records the block-stack residual ``h_out - h_in`` (and the
text stream's, for FLUX and SD3) into a recache mechanism. A cached step adds the mechanism's estimate of that
residual to the input of the first block: ``reuse`` the last residual (FORA), ``taylorseer`` or ``hicache`` a
forecast from the last computed steps. Embeddings and the final norm/projection run every step.

The mask of a generation comes from a fixed ``Schedule``, a learned planner (a ``ReCachePolicy``, for any step
count) or the uniform schedule, for the budget resolved against the generation's step count ``T``. State is kept
per cache context (diffusers pipelines call the transformer in ``cache_context("cond")`` / ``("uncond")``, so each
CFG branch runs its own budget), starts afresh with every generation, and is dropped after its last step. The
unconditional branch may have a budget of its own (``uncond_budget``), also where a pipeline batches both branches
in one call: its rows are then planned by halves.

A pipeline with two denoisers (Wan 2.2: a high-noise and a low-noise expert) is hooked as one: the generation has one
schedule of exactly ``k`` passes over both, and each expert keeps its own residuals. The first step an expert runs
has nothing of its own to forecast from, so (ours) it computes and the next planned pass of the generation is
dropped in exchange; when no planned pass is left, that expert's steps are filled from the other expert's cache.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from recache.errors import RecacheError, RecacheWarning
from recache.hooks.clock import Clock, StepPosition, next_position, noise_level
from recache.hooks.transformers import check_blocks_not_compiled, model_fingerprint, transformer_blocks
from recache.mechanisms import DEFAULT_MECHANISM, HOOK_MECHANISMS, get_mechanism
from recache.mechanisms.base import ALL, distinct_rows, take
from recache.schedule import Budget, Schedule, SchedulePlanner, check_budget_form, resolve_budget

_CALL_HOOK, _BLOCK_HOOK = "recache_call", "recache_block"
_DEFAULT_CONTEXT = "default"  # the state of calls made outside any cache_context
UNCOND, BATCHED = "uncond", "cond_uncond"  # diffusers' contexts of the unconditional branch and of both batched
_GIVE_STEPS = ("give the loop's step count (num_inference_steps, recache.refresh, or "
               "cache_context(name, step_index=i, num_inference_steps=T))")


@dataclass
class RecacheHookConfig:
    """Configuration of ``apply_recache``.

    Args:
        budget: full passes per generation and CFG branch: an int ``k``, a fraction of the steps in (0, 1], or a
            speed-up such as ``"4x"`` (resolved per call against its step count). May be omitted with ``schedule``.
        mechanism: what fills a cached step: ``reuse``, ``taylorseer`` or ``hicache``.
        policy: a ``SchedulePlanner`` (a learned ``ReCachePolicy``) giving the schedule for any budget and step
            count; ``None`` uses the uniform schedule (or ``schedule``).
        schedule: a fixed ``Schedule``; a call must then run exactly ``schedule.T`` steps.
        num_inference_steps: the step count ``T`` when neither the clock nor the cache context says it (a
            transformer driven directly).
        clock: where each call sits in its generation (``recache.enable`` passes ``pipeline_clock(pipe)``, which
            reads the pipeline's scheduler); without it, the cache context's ``step_index`` or the calls' noise
            levels tell (``clock.py``).
        allow_extrapolate: let the policy plan for a step count, sigma grid or budget outside its trained range.
        row_schedules: one fixed schedule per batch row (rollouts of several schedules in one pipeline call): row
            ``r`` of a call follows ``row_schedules[r mod R]``, so a call whose CFG branches share the batch (SD3)
            gives both halves the same schedules. At a step where only some rows compute, the blocks run on those
            rows alone (every block argument with the call's batch rows is sliced) and the others take their
            estimate; computing rows whose block inputs are equal run once (``_find_equal_rows``).
        uncond_budget: the full passes of the unconditional CFG branch, when they should differ from ``budget``
            (ours; FasterCache, Lv et al. 2024, found that branch the more redundant one). Its calls are known by
            their cache context: "uncond" (CFG as two calls: FLUX's true CFG, Wan) is planned for it; a call that
            batches both branches ("cond_uncond": CogVideoX, LTX, Mochi; or, with ``batched_cfg``, SD3's calls
            outside any context) gives the first half of its rows, the unconditional ones in diffusers' order, this
            budget and the second half ``budget``.
        batched_cfg: whether a call made outside any cache context batches the CFG branches [uncond; cond], asked
            at the start of each generation (``recache.enable`` reads the pipeline's ``do_classifier_free_guidance``).
    """

    budget: Budget | None = None
    mechanism: str = DEFAULT_MECHANISM
    policy: SchedulePlanner | None = None
    schedule: Schedule | None = None
    num_inference_steps: int | None = None
    clock: Clock | None = field(default=None, repr=False)
    allow_extrapolate: bool = False
    row_schedules: tuple[Schedule, ...] | None = None
    uncond_budget: Budget | None = None
    batched_cfg: Callable[[], bool] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mechanism not in HOOK_MECHANISMS:
            raise RecacheError(f"mechanism {self.mechanism!r} cannot run as a diffusers hook; "
                               f"choose one of {', '.join(HOOK_MECHANISMS)}")
        if self.row_schedules is not None:
            self._check_row_schedules()
        elif self.budget is None and self.schedule is None:
            raise RecacheError("give a budget (k, a fraction of the steps, or a speed-up like '4x') or a schedule")
        if self.schedule is not None and self.policy is not None:
            raise RecacheError("give a policy or a fixed schedule, not both")
        if self.allow_extrapolate and (self.policy is None or "allow_extrapolate" not in
                                       inspect.signature(self.policy.schedule_for_steps).parameters):
            raise RecacheError("allow_extrapolate applies to a policy that plans outside its trained range; "
                               "this configuration has none")
        if self.policy is not None and self.policy.mechanism != self.mechanism:
            raise RecacheError(f"the policy was trained for mechanism {self.policy.mechanism!r}, "
                               f"not {self.mechanism!r}")
        if self.budget is not None:
            check_budget_form(self.budget)
        if self.uncond_budget is not None:
            self._check_uncond_budget()
        if self.num_inference_steps is not None:  # a budget that cannot run is refused now, not at the first call
            self.plan_rows(self.num_inference_steps, branch=BATCHED)
        if self.fixed_steps is not None:
            self.plan_rows(self.fixed_steps)

    @property
    def fixed_steps(self) -> int | None:
        """The step count of the fixed schedule(s), if any."""
        fixed = self.schedule or (self.row_schedules[0] if self.row_schedules else None)
        return fixed.T if fixed is not None else None

    def _check_row_schedules(self) -> None:
        self.row_schedules = tuple(self.row_schedules)
        if not self.row_schedules or not all(isinstance(s, Schedule) for s in self.row_schedules):
            raise RecacheError("row_schedules must be a non-empty list of Schedules, one per batch row")
        if self.budget is not None or self.schedule is not None or self.policy is not None:
            raise RecacheError("give row_schedules alone, without a budget, schedule or policy")
        if len({s.T for s in self.row_schedules}) > 1:
            raise RecacheError(f"row schedules must share one step count, got T = "
                               f"{sorted({s.T for s in self.row_schedules})}")

    def _check_uncond_budget(self) -> None:
        if self.budget is None or self.schedule is not None or self.row_schedules is not None:
            raise RecacheError("uncond_budget goes with a budget (and optionally a policy), not with a fixed schedule "
                               "or row schedules")
        check_budget_form(self.uncond_budget)

    def plan_rows(self, T: int, sigmas: torch.Tensor | None = None, branch: str | None = None) -> list[Schedule]:
        """The schedule of each batch row of a generation of ``T`` steps: one, shared, unless ``row_schedules``, or,
        with ``uncond_budget``, the unconditional branch's for a call of that branch (``branch`` ``UNCOND``) and
        [unconditional, conditional] for one that batches both (``BATCHED``: by halves of the rows)."""
        if self.row_schedules is None:
            if self.uncond_budget is None or branch is None:
                return [self.plan(T, sigmas)]
            uncond = self.plan(T, sigmas, self.uncond_budget)
            return [uncond] if branch == UNCOND else [uncond, self.plan(T, sigmas)]
        if self.row_schedules[0].T != T:
            raise RecacheError(f"the row schedules are for T={self.row_schedules[0].T} steps, but this call runs {T}")
        for schedule in self.row_schedules:
            check_aligned_grid(schedule, sigmas)
        return list(self.row_schedules)

    def plan(self, T: int, sigmas: torch.Tensor | None = None, budget: Budget | None = None) -> Schedule:
        """The schedule of a generation of ``T`` steps on the sampler's grid ``sigmas`` (``T + 1`` values, when the
        pipeline's scheduler tells them), for ``budget`` (default: the config's): a policy checks the grid against
        its trained ones, a fixed schedule with ``aligned_sigmas`` must run on them."""
        if self.schedule is not None:
            if self.schedule.T != T:
                raise RecacheError(f"the schedule is for T={self.schedule.T} steps, but this call runs {T}")
            if self.budget is not None and resolve_budget(self.budget, T) != self.schedule.k:
                raise RecacheError(f"budget {self.budget!r} asks for k={resolve_budget(self.budget, T)}, "
                                   f"the schedule has k={self.schedule.k}")
            check_aligned_grid(self.schedule, sigmas)
            return self.schedule
        k = resolve_budget(self.budget if budget is None else budget, T)
        if self.policy is None:
            return Schedule.uniform(T, k)
        takes = inspect.signature(self.policy.schedule_for_steps).parameters  # a planner of one's own may take (k, T)
        options = {"allow_extrapolate": self.allow_extrapolate, "sigmas": sigmas}
        return self.policy.schedule_for_steps(k, T, **{key: v for key, v in options.items() if key in takes})


def check_aligned_grid(schedule: Schedule, sigmas: torch.Tensor | None) -> None:
    """A schedule searched with an aligned grid (``recache align``) is only good on that grid: the sampler must run
    it. Checked where the pipeline's scheduler tells its grid; a loop of one's own must pass it itself."""
    aligned = schedule.metadata.get("aligned_sigmas")
    if aligned is None or sigmas is None:
        return
    aligned = torch.tensor(aligned, dtype=torch.float64)
    if len(sigmas) != len(aligned) or not torch.allclose(sigmas.double(), aligned, atol=1e-4):
        shift = schedule.metadata.get("aligned_shift")
        how = (f"set the scheduler's shift to its aligned_shift {shift:g} (use_dynamic_shifting=False)" if shift
               else "pass the aligned grid to the call (sigmas=aligned_sigmas[:-1], with a scheduler that does not "
                    "shift them)")
        raise RecacheError(f"the schedule was aligned to its own sigma grid (aligned_sigmas) and this pipeline's "
                           f"scheduler runs another; {how} or use the schedule without aligned_sigmas")


@dataclass
class RecacheStats:
    """What the hooks did: one record per finished generation (per context: ``T``, planned ``k``, the computed
    steps, how many steps were cached, the calls made inside a step beyond the first and how many of those ran
    the blocks), and the generation in progress."""

    mechanism: str
    calls: list[dict[str, dict]] = field(default_factory=list)
    current: dict[str, dict] = field(default_factory=dict)

    def finish(self) -> None:
        if self.current:
            self.calls.append(self.current)
            self.current = {}

    @property
    def last(self) -> dict[str, dict]:
        """The last finished generation, or the one in progress if none has finished."""
        return self.calls[-1] if self.calls else self.current


def steps_run(record: dict) -> int:
    """The steps a generation's record has run so far, computed or cached."""
    return len(record["computed_steps"]) + record["cached_steps"]


class _Stream:
    """The caching state of one stream of calls in a generation: the first call of every step (stream 0), or the
    n-th further call inside a step (stream n: SD3's skip-layer guidance), which has inputs and residuals of its
    own. Ours: a further call follows its step's decision, but computes while its stream has nothing recorded."""

    def __init__(self, mechanism: str, steps: int):
        self.mechanisms = {"h": get_mechanism(mechanism), "e": get_mechanism(mechanism)}
        self.steps, self.recorded, self.has_e = steps, False, False
        self.row_class: list[int] | None = None  # rows of one class have had equal inputs at every step so far

    def record(self, step: int, h_in, h_out, e_in, e_out, rows=ALL) -> None:
        """Record the residuals of a computed step's ``rows``; the state is sized by the first call's rows (streams
        may have no batch axis)."""
        streams = (("h", h_in, h_out),) + ((("e", e_in, e_out),) if e_in is not None and e_out is not None else ())
        for key, x_in, x_out in streams:
            if not self.recorded or (key == "e" and not self.has_e):
                self.mechanisms[key].reset(x_in.shape[0], self.steps)
            self.mechanisms[key].record(step, rows, take(x_in, rows), take(x_out, rows))
        self.has_e = self.has_e or len(streams) == 2
        self.recorded = True


class _ContextState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.position = self.level = self.schedule = self.record = self.stream = None
        self.streams: dict[tuple[int, int], _Stream] = {}  # (expert, call index inside the step) -> its state
        self.masks: torch.Tensor | None = None  # (rows, T): the generation's plans, as it goes (a pass may move to
        self.planned: torch.Tensor | None = None  # where an expert starts); the rows' plans at this call's step
        self.cached_rows = self.computed_rows = None  # at a step where only some rows compute: their indices
        self.computing: list[int] = []  # and the computing rows' as a list
        self.merge_rows = False  # rows of a row-schedules call with equal inputs run the blocks once
        self.merged: _Merged | None = None  # at this step, if some computing rows are equal
        self.checked: tuple[torch.Tensor, ...] = ()  # the batch tensors the merged rows were found equal in
        self.sliceable: dict[tuple[int, int], bool] = {}  # (block hook, batch): can its arguments be cut to rows
        self.by_halves = False  # the plans cover the rows by halves ([uncond; cond]), not in turn (row r: r mod R)
        self.calls_in_step, self.compute, self.filled = 0, True, False
        self.h_in = self.e_in = self.h_out = self.e_out = None
        self.added_h = self.added_e = None  # what the model added to the streams between blocks (ControlNet)


@dataclass
class _Merged:
    """Computing rows of a step with equal block inputs: the blocks run on ``first`` (call rows, one per kind); the
    computing rows (in ``computed_rows`` order, or all rows) take output row ``inverse``; ``copies`` are the rows that
    take another's, which is ``of``."""

    first: torch.Tensor
    inverse: torch.Tensor
    copies: torch.Tensor
    of: torch.Tensor


class _StateManager(StateManager):
    """diffusers' ``StateManager``; a call made outside any ``cache_context`` uses the ``default`` state."""

    @property
    def context(self) -> CacheContext:
        return self._context if self._context is not None else CacheContext(_DEFAULT_CONTEXT)


def _io(meta, args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, encoder_hidden_states or None) of a block call, by the block's registered metadata."""
    h = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    if meta.return_encoder_hidden_states_index is None:
        return h, None
    return h, meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)


def _outputs(meta, out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, encoder_hidden_states or None) of a block's output (SD3's last block returns no text)."""
    out = out if isinstance(out, tuple) else (out,)
    e_at = meta.return_encoder_hidden_states_index
    return out[meta.return_hidden_states_index], (out[e_at] if e_at is not None else None)


def _pack(meta, h, e):
    """A block's output from the streams, in the order its class returns them."""
    if meta.return_encoder_hidden_states_index is None:
        return h
    out = [None, None]
    out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = h, e
    return tuple(out)


class _BlockHook(ModelHook):
    """On a computing call: runs the block (the first block to run keeps the stack's input, every block leaves its
    output, so the last one run gives the stack's output, whichever layers a call skips; what the model adds between
    blocks is noted). On a cached call: the first block reached returns its input plus the mechanism's estimate of
    the stack residual, the others pass their input through. A call whose rows follow different schedules runs
    ``_forward_rows`` at the steps where only some of them compute."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager):
        super().__init__()
        self.state_manager = state_manager

    def initialize_hook(self, module):
        self.meta = TransformerBlockRegistry.get(type(module))
        return module

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.state_manager.get_state()
        if st.compute or st.stream is None:
            if st.h_in is None:
                h, e = _io(self.meta, args, kwargs)  # clone: a block may write its input in place
                st.h_in, st.e_in = h.clone(), (e.clone() if e is not None else None)
                _split_rows(st)
                if st.merge_rows:
                    _find_equal_rows(st, (args, kwargs))
            else:
                _note_additions(st, *_io(self.meta, args, kwargs))
            if st.cached_rows is not None or st.merged is not None:
                return self._forward_rows(st, args, kwargs)
            out = self.fn_ref.original_forward(*args, **kwargs)
            st.h_out, st.e_out = _outputs(self.meta, out)
            return out
        h, e = _io(self.meta, args, kwargs)
        if not st.filled:
            st.filled = True
            h, e = _fill(st, h, e)
        return _pack(self.meta, h, e)

    def _forward_rows(self, st: _ContextState, args, kwargs):
        """A step where only some rows compute, or where some computing rows are equal: the cached rows start the
        stack from their estimate and pass through every block. The computing rows run the block alone when its
        arguments can be cut to them (every tensor with the call's batch rows is sliced; one with a multiple of them,
        such as a mask repeated per head, cannot be), one row of each equal kind; otherwise the block runs on every
        row and the cached rows keep their input (ours: the union's cost)."""
        h, e = _io(self.meta, args, kwargs)
        if not st.filled:  # the first block: the cached rows take their estimate of the stack's output
            st.filled = True
            if st.cached_rows is not None:
                h, e = _fill(st, h, e, st.cached_rows)
            st.checked = (*st.checked, h) + ((e,) if e is not None else ())
        batch = h.shape[0]
        args, kwargs = _put(self.meta, args, kwargs, self.meta.hidden_states_argument_name, h)
        if e is not None:
            args, kwargs = _put(self.meta, args, kwargs, self.meta.encoder_hidden_states_argument_name, e)
        key = (id(self), batch)  # a block's arguments keep their layout for a batch size through a generation
        if key not in st.sliceable:
            st.sliceable[key] = _sliceable((args, kwargs), batch)
        if st.sliceable[key]:
            h_new, e_new = self._forward_computing_rows(st, args, kwargs, batch)
            rows = st.computed_rows
            h_out = h_new if rows is None else h.index_copy(0, rows, h_new)
            e_out = e_new if rows is None or e is None or e_new is None else e.index_copy(0, rows, e_new)
        else:
            rows = st.cached_rows
            h_out, e_out = _outputs(self.meta, self.fn_ref.original_forward(*args, **kwargs))
            if rows is not None:
                h_out = h_out.index_copy(0, rows, h[rows])
                e_out = e_out.index_copy(0, rows, e[rows]) if e is not None and e_out is not None else e_out
        st.h_out, st.e_out = h_out, e_out
        return _pack(self.meta, h_out, e_out)

    def _forward_computing_rows(self, st: _ContextState, args, kwargs, batch: int):
        """The block's streams on the computing rows (in ``computed_rows`` order, or all rows), each equal kind of
        row run once while the merged rows' inputs stay equal."""
        merged = st.merged if st.merged is not None and _still_equal(st, (args, kwargs), batch) else None
        rows = merged.first if merged is not None else st.computed_rows
        if rows is None:
            return _outputs(self.meta, self.fn_ref.original_forward(*args, **kwargs))
        out = self.fn_ref.original_forward(*(_rows_of(a, rows, batch) for a in args),
                                           **{k: _rows_of(v, rows, batch) for k, v in kwargs.items()})
        h_new, e_new = _outputs(self.meta, out)
        if merged is None:
            return h_new, e_new
        st.record["shared_block_runs"] = st.record.get("shared_block_runs", 0) + len(merged.copies)
        return h_new.index_select(0, merged.inverse), (e_new.index_select(0, merged.inverse)
                                                        if e_new is not None else None)


def _note_additions(st: _ContextState, h: torch.Tensor, e: torch.Tensor | None) -> None:
    """A block whose input is not the previous block's output got something added between them (ControlNet
    residuals, Wan VACE's hints). Kept apart from the blocks' residual, so a cached step (where the model adds the
    step's own) does not add them twice. Ours."""
    if h is not st.h_out and h.shape == st.h_out.shape:
        st.added_h = h - st.h_out if st.added_h is None else st.added_h + (h - st.h_out)
    if e is not None and st.e_out is not None and e is not st.e_out and e.shape == st.e_out.shape:
        st.added_e = e - st.e_out if st.added_e is None else st.added_e + (e - st.e_out)


def _rows_of(value, rows: torch.Tensor, batch: int):
    """``value``'s batch rows ``rows`` when it is a tensor with ``batch`` rows (or a tuple or list holding some);
    anything else (rotary embeddings, masks without a batch axis, flags) as it is."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() and value.shape[0] == batch else value
    if type(value) in (tuple, list):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    return value


def _sliceable(value, batch: int) -> bool:
    """Whether no tensor in ``value`` (nested in tuples, lists and dicts) has a multiple of ``batch`` rows other than
    ``batch`` itself (a batch repeated per head or per branch, which slicing rows would break)."""
    if isinstance(value, torch.Tensor):
        return not (value.dim() and value.shape[0] != batch and value.shape[0] % batch == 0)
    items = value.values() if isinstance(value, dict) else value if type(value) in (tuple, list) else ()
    return all(_sliceable(v, batch) for v in items)


def _put(meta, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """The block call's arguments with ``name`` replaced by ``value`` (``_io`` found where it is)."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    at = meta._cached_parameter_indices[name]
    return (*args[:at], value, *args[at + 1:]), kwargs


@torch.compiler.disable
def _split_rows(st: _ContextState) -> None:
    """At a step where only some rows' schedules compute: which rows of the call compute and which take their
    estimate (row ``r`` of a call follows plan ``r mod R``, or, by halves, plan ``r // (rows / 2)``)."""
    if st.planned is None or bool(st.planned.all()):
        return
    rows, plans = st.h_in.shape[0], len(st.planned)
    if rows % plans:
        what = "branches' schedules, by halves" if st.by_halves else "row schedules"
        raise RecacheError(f"a call of {rows} batch rows cannot follow {plans} {what}: its batch must be a "
                           "multiple of their number")
    each = rows // plans
    computes = st.planned.repeat_interleave(each) if st.by_halves else st.planned.repeat(each)  # on the CPU: no sync
    st.computing = computes.nonzero().squeeze(1).tolist()
    st.computed_rows = torch.tensor(st.computing, device=st.h_in.device)
    st.cached_rows = (~computes).nonzero().squeeze(1).to(st.h_in.device)


@torch.compiler.disable
def _find_equal_rows(st: _ContextState, call: tuple[tuple, dict]) -> None:
    """Rows of a row-schedules call that compute at this step with equal block inputs (the rollouts of one prompt
    and seed share their state until their schedules first differ) run the blocks once: ``st.merged``. Candidates
    are the computing rows whose class (equal so far) has others computing too; the first block's batch tensors
    decide, element for element (``distinct_rows``), and refine the classes. Ours."""
    rows, stream = st.h_in.shape[0], st.stream
    if rows < 2:
        return
    if stream.row_class is None or len(stream.row_class) != rows:
        stream.row_class = [0] * rows
    computing = list(range(rows)) if st.computed_rows is None else st.computing
    computes = set(computing)
    keys = [(c, r in computes) for r, c in enumerate(stream.row_class)]  # a class splits where its rows' plans do
    counts = Counter(keys)
    candidates = [r for r in computing if counts[keys[r]] > 1]
    kind_of = {}  # candidate row -> the row whose output it takes (itself if none)
    if candidates:
        index = torch.tensor(candidates, device=st.h_in.device)
        tensors = _batch_tensors(call, rows)
        found = distinct_rows(*(t.index_select(0, index) for t in tensors))
        first, inverse = found if found is not None else (range(len(candidates)), range(len(candidates)))
        kind_of = {r: candidates[int(first[int(i)])] for r, i in zip(candidates, inverse, strict=True)}
    labels: dict = {}
    stream.row_class = [labels.setdefault((keys[r], kind_of.get(r)), len(labels)) for r in range(rows)]
    copies = [r for r in computing if kind_of.get(r, r) != r]
    if not copies:
        return
    kinds = list(dict.fromkeys(kind_of.get(r, r) for r in computing))
    at = {row: i for i, row in enumerate(kinds)}
    device = st.h_in.device
    st.merged = _Merged(torch.tensor(kinds, device=device),
                        torch.tensor([at[kind_of.get(r, r)] for r in computing], device=device),
                        torch.tensor(copies, device=device), torch.tensor([kind_of[r] for r in copies], device=device))
    st.checked = tuple(tensors)


def _still_equal(st: _ContextState, call: tuple[tuple, dict], batch: int) -> bool:
    """Whether the merged rows' inputs to this block are still equal: each batch tensor is one the first block's
    were found equal in, the last block's output, or compared again (what the model added between blocks, such as
    ControlNet residuals, may differ by row); if not, the rest of the step runs every computing row."""
    for t in _batch_tensors(call, batch):
        if t is st.h_out or t is st.e_out or any(t is c for c in st.checked):
            continue
        if not torch.equal(t.index_select(0, st.merged.copies), t.index_select(0, st.merged.of)):
            st.merged = None
            return False
    return True


def _batch_tensors(value, batch: int) -> list[torch.Tensor]:
    """The tensors with ``batch`` rows in ``value`` (nested in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.dim() and value.shape[0] == batch else []
    items = value.values() if isinstance(value, dict) else value if type(value) in (tuple, list) else ()
    return [t for v in items for t in _batch_tensors(v, batch)]


@torch.compiler.disable
def _fill(st: _ContextState, h: torch.Tensor, e: torch.Tensor | None,
          rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stack's estimated output on a cached step, for all rows or only ``rows`` (the others kept). Kept out of
    ``torch.compile``: traced, the step number and the mechanism's history would be guarded on and recompile the
    model at every step."""
    step = st.position.step
    if rows is None:
        h = st.stream.mechanisms["h"].cached_pass(step, ALL, h, None, ())
        if e is not None and st.stream.has_e:
            e = st.stream.mechanisms["e"].cached_pass(step, ALL, e, None, ())
        return h, e
    h = h.index_copy(0, rows, st.stream.mechanisms["h"].cached_pass(step, rows, take(h, rows), None, ()))
    if e is not None and st.stream.has_e:
        e = e.index_copy(0, rows, st.stream.mechanisms["e"].cached_pass(step, rows, take(e, rows), None, ()))
    return h, e


class _CallHook(ModelHook):
    """On the transformer: places each call in its generation (``clock``), starts a generation (its plan for the
    call's own step count, fresh mechanism state), decides compute or cache, and after the blocks records the
    stack residual ``h_out - h_in``. A stream's state is dropped after its generation's last step. ``expert``
    numbers the denoisers of a pipeline that share one generation (Wan 2.2's two)."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: RecacheHookConfig, stats: RecacheStats,
                 blocks: list[torch.nn.Module], expert: int, group: list[torch.nn.Module]):
        super().__init__()
        self.state_manager, self.config, self.stats = state_manager, config, stats
        self.blocks, self.expert, self.group = blocks, expert, group  # group: the transformers hooked together

    def initialize_hook(self, module):
        names, self.model_name = list(inspect.signature(module.forward).parameters), type(module).__name__
        self.timestep_at = names.index("timestep") if "timestep" in names else None
        return module

    def reset_state(self, module):
        self.stats.finish()
        self.state_manager.reset()
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.state_manager.get_state()
        timestep = kwargs.get("timestep", args[self.timestep_at] if self.timestep_at is not None
                              and self.timestep_at < len(args) else None)
        self._begin(st, timestep)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self._end(st)
        return out

    def _position(self, st: _ContextState, timestep) -> tuple[StepPosition, float | None]:
        """The call's position, and its noise level when no clock gave the position (a GPU sync, done only then)."""
        position = self.config.clock() if self.config.clock is not None else None
        if position is not None:
            return position, None
        ctx, level = self.state_manager.context, noise_level(timestep)
        last = st.position if st.position is not None and not st.position.from_pipeline else None
        return next_position(last, st.level, level, ctx.step_index, ctx.num_inference_steps), level

    @torch.compiler.disable
    def _begin(self, st: _ContextState, timestep) -> None:
        position, level = self._position(st, timestep)
        if st.position is None or position.call is not st.position.call:
            self._start(st, position)
        elif position.step == st.position.step:
            st.calls_in_step += 1  # another call inside this step
        else:
            st.calls_in_step = 1
        if position.step >= st.schedule.T:
            raise RecacheError(f"this generation runs more than the T={st.schedule.T} steps it was planned for; "
                               + _GIVE_STEPS)
        st.position, st.level = position, level
        index = st.calls_in_step - 1
        if (self.expert, index) not in st.streams:
            self._new_stream(st, index)
        st.stream = st.streams[(self.expert, index)]
        masks = st.masks[-1:] if st.by_halves and index else st.masks  # a further call (skip-layer guidance): cond
        st.planned = masks[:, position.step] if st.stream.recorded else torch.ones(len(masks), dtype=torch.bool)
        st.compute, st.filled, st.cached_rows, st.computed_rows = bool(st.planned.any()), False, None, None
        st.merged, st.checked = None, ()
        st.h_in = st.e_in = st.h_out = st.e_out = st.added_h = st.added_e = None
        if index > 0:
            st.record["extra_calls"] += 1
            st.record["extra_passes"] += int(st.compute)
        elif st.compute:
            st.record["computed_steps"].append(position.step)
            st.record["row_passes"] = [n + int(p) for n, p in zip(st.record["row_passes"], st.planned, strict=True)]
        else:
            st.record["cached_steps"] += 1

    def _new_stream(self, st: _ContextState, index: int) -> None:
        """The state of this expert's ``index``-th call in a step. When an expert's first call of a generation falls
        on a cached step (Wan 2.2's second expert), it computes and the next planned pass is dropped, so the
        generation still makes exactly ``k``; with no planned pass left, it is filled from another expert's cache."""
        step, others = st.position.step, [s for (e, i), s in st.streams.items() if i == index and s.recorded]
        mask = st.masks[0]  # experts run one schedule for all rows (apply_recache refuses different row schedules)
        if index == 0 and others and not mask[step]:
            later = next((j for j in range(step + 1, len(mask)) if mask[j]), None)
            if later is None:
                st.streams[(self.expert, index)] = others[-1]
                st.record["filled_from_other_expert"] = step
                return
            st.masks[:, step], st.masks[:, later] = True, False
            st.record["moved_passes"].append([later, step])
        st.streams[(self.expert, index)] = _Stream(self.config.mechanism, st.schedule.T)

    def _start(self, st: _ContextState, position: StepPosition) -> None:
        T = position.steps or self.config.num_inference_steps or self.config.fixed_steps
        if not T:
            raise RecacheError("cannot tell how many steps this call runs: pass num_inference_steps to "
                               "RecacheHookConfig (or use recache.enable on the pipeline)")
        check_blocks_not_compiled(self.model_name, self.blocks)
        sigmas = position.sigmas.detach().double().cpu() if position.sigmas is not None else None
        name = self.state_manager.context.name
        branch = name if name in (UNCOND, BATCHED) else None
        if name == _DEFAULT_CONTEXT and self.config.batched_cfg is not None and self.config.batched_cfg():
            branch = BATCHED
        schedules = self.config.plan_rows(int(T), sigmas, branch)  # refused here, the last generation is untouched
        by_halves = len(schedules) == 2 and self.config.row_schedules is None
        if by_halves and len(self.group) > 1:
            raise RecacheError("uncond_budget on a call batching both CFG branches runs on one denoiser; this "
                               f"pipeline has {len(self.group)} (Wan 2.2's experts): leave uncond_budget out")
        self._close(st)
        st.reset()
        schedule, st.by_halves = schedules[0], by_halves
        st.merge_rows = self.config.row_schedules is not None
        st.schedule, st.masks, st.calls_in_step = schedule, torch.tensor([s.mask for s in schedules]), 1
        if name in self.stats.current:
            self.stats.finish()
        st.record = self.stats.current[name] = {
            "T": schedule.T, "k": schedule.k if len(schedules) == 1 else [s.k for s in schedules],
            "computed_steps": [], "cached_steps": 0, "row_passes": [0] * len(schedules),
            "source": schedule.metadata.get("source", "schedule"), "extra_calls": 0, "extra_passes": 0,
            "moved_passes": [], **({"by_halves": True} if st.by_halves else {}),
            **{key: schedule.metadata[key] for key in ("fallback", "guard") if key in schedule.metadata}}

    def _check_residual(self, st: _ContextState) -> None:
        """The blocks must map each stream to one of the same shape, or there is no residual to cache (a stack
        that concatenates or splits streams inside it, or a block registered with the wrong outputs). Such a model
        is unhooked, with one line naming it."""
        pairs = [("image", st.h_in, st.h_out)] + ([("text", st.e_in, st.e_out)] if st.e_out is not None else [])
        bad = [(n, tuple(a.shape), tuple(b.shape)) for n, a, b in pairs if a is not None and a.shape != b.shape]
        if bad:
            remove_recache(self.group)
            name, shape_in, shape_out = bad[0]
            raise RecacheError(f"transformer {self.model_name} is not supported: its blocks turn the {name} stream "
                               f"{shape_in} into {shape_out}, so they do not form one residual stack; "
                               "recache was removed from it")

    def _close(self, st: _ContextState) -> None:
        """The previous generation of this context ends: if it ran fewer steps than planned, say so (a pipeline call
        cut short by an exception, or a loop that ran fewer steps than the plan was made for)."""
        record = st.record
        if record is None or steps_run(record) == record["T"]:
            return
        record["cut_short"] = True
        if not st.position.from_pipeline:
            warnings.warn(f"a generation on this transformer ran {steps_run(record)} of the T={record['T']} steps "
                          f"its plan was made for (computed {len(record['computed_steps'])} of k={record['k']}); "
                          + _GIVE_STEPS, RecacheWarning, stacklevel=4)

    @torch.compiler.disable
    def _end(self, st: _ContextState) -> None:
        stream, step = st.stream, st.position.step
        if st.compute and st.h_out is not None:
            self._check_residual(st)
            rows = ALL if st.computed_rows is None else st.computed_rows
            h_in = st.h_in if st.added_h is None else st.h_in + st.added_h  # the blocks' own residual only
            e_in = st.e_in if st.added_e is None or st.e_in is None else st.e_in + st.added_e
            stream.record(step, h_in, st.h_out, e_in, st.e_out, rows)
        st.h_in = st.e_in = st.h_out = st.e_out = st.added_h = st.added_e = None
        if step == st.schedule.T - 1:  # the generation's last step: nothing of this stream is needed any more
            index = st.calls_in_step - 1
            st.streams = {key: s for key, s in st.streams.items() if key[1] != index and index != 0}
            st.stream = None
            if all(steps_run(r) == r["T"] for r in self.stats.current.values()):
                self.stats.finish()


def apply_recache(transformer: torch.nn.Module | Sequence[torch.nn.Module], config: RecacheHookConfig) -> RecacheStats:
    """Register the recache hooks on a diffusers transformer whose blocks diffusers registers (``transformers.py``),
    or on the denoisers of one pipeline together (Wan 2.2's two experts: one schedule for the generation); returns
    the stats object the hooks fill (``recache.summary`` reads it). Everything is checked before a model is
    touched."""
    transformers = [transformer] if isinstance(transformer, torch.nn.Module) else list(transformer)
    stacks = [transformer_blocks(t) for t in transformers]
    if config.row_schedules is not None and len(transformers) > 1 and len(set(config.row_schedules)) > 1:
        raise RecacheError("different row schedules run on one denoiser; this pipeline has "
                           f"{len(transformers)} (Wan 2.2's experts): give all rows one schedule")
    for t in transformers:
        _check_can_hook(t, config)
    state_manager, stats = _StateManager(_ContextState), RecacheStats(config.mechanism)
    for expert, (t, blocks) in enumerate(zip(transformers, stacks, strict=True)):
        registry = HookRegistry.check_if_exists_or_initialize(t)
        registry.register_hook(_CallHook(state_manager, config, stats, blocks, expert, transformers), _CALL_HOOK)
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(state_manager), _BLOCK_HOOK)
        registry.invalidate_child_registries_cache()
        if hasattr(type(t), "is_cache_enabled"):  # registered as the model's cache: diffusers' enable_cache
            t._cache_config = config  # now refuses a second cache, as apply_recache refuses one of diffusers'
    return stats


def _check_can_hook(transformer: torch.nn.Module, config: RecacheHookConfig) -> None:
    if is_recache_enabled(transformer):
        raise RecacheError("recache is already enabled on this transformer; disable it first "
                           "(recache.disable / remove_recache)")
    if getattr(transformer, "is_cache_enabled", False):
        raise RecacheError("a diffusers cache is enabled on this transformer; call transformer.disable_cache() first "
                           "(one cache at a time)")
    if config.policy is not None and config.policy.model != model_fingerprint(transformer):
        raise RecacheError(f"the policy was trained for model {config.policy.model!r}, "
                           f"not {model_fingerprint(transformer)!r}")


def _call_hook(transformer: torch.nn.Module) -> _CallHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(_CALL_HOOK) if registry is not None else None


def is_recache_enabled(transformer: torch.nn.Module) -> bool:
    return _call_hook(transformer) is not None


def recache_stats(transformer: torch.nn.Module) -> RecacheStats | None:
    hook = _call_hook(transformer)
    return hook.stats if hook is not None else None


def recache_config(transformer: torch.nn.Module) -> RecacheHookConfig | None:
    hook = _call_hook(transformer)
    return hook.config if hook is not None else None


def reset_recache(transformer: torch.nn.Module) -> None:
    """Start a new generation on every context (what a pipeline does at the end of each call)."""
    hook = _call_hook(transformer)
    if hook is not None:
        hook.reset_state(transformer)


def remove_recache(transformer: torch.nn.Module | Sequence[torch.nn.Module]) -> None:
    """Remove the hooks (from each of the denoisers given); each computes exactly as before ``apply_recache``."""
    for model in [transformer] if isinstance(transformer, torch.nn.Module) else transformer:
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                for name in (_CALL_HOOK, _BLOCK_HOOK):
                    registry.remove_hook(name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        if isinstance(getattr(model, "_cache_config", None), RecacheHookConfig):
            model._cache_config = None
