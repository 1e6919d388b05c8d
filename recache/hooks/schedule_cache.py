"""Budgeted step caching on diffusers transformers through diffusers' hook system (``HookRegistry``).

A head hook on the first block decides, at every denoising step, whether this step computes (``mask[step] = 1``)
or is cached; other blocks run or pass their inputs through; the last block records the block-stack residual
``h_out - h_in`` (and the text stream's, for FLUX and SD3) into a recache mechanism. A cached step adds the
mechanism's estimate of that residual to the fresh block input: ``reuse`` the last residual (FORA), ``taylorseer``
or ``hicache`` a forecast from the last computed steps. Embeddings and the final norm/projection run every step.

The mask of a call comes from a fixed ``Schedule``, a learned ``ReCachePolicy`` (for any step count) or the uniform
schedule, for the budget resolved against the call's step count ``T``. State is kept per cache context (diffusers
pipelines call the transformer in ``cache_context("cond")`` / ``("uncond")``, so each CFG branch runs its own
budget) and reset at the end of every pipeline call; a transformer driven directly starts a new generation after
``T`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from recache.errors import RecacheError
from recache.hooks.transformers import model_fingerprint, transformer_blocks
from recache.mechanisms import DEFAULT_MECHANISM, HOOK_MECHANISMS, get_mechanism
from recache.schedule import Budget, Schedule, SchedulePlanner, check_budget_form, resolve_budget

_HEAD_HOOK, _BLOCK_HOOK = "recache_head", "recache_block"
_DEFAULT_CONTEXT = "default"  # the state of calls made outside any cache_context


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
        num_inference_steps: the step count ``T`` when neither the cache context nor ``steps_source`` says it.
        call_started: True while the running pipeline call has not taken its first scheduler step (``recache.enable``
            passes the scheduler's ``step_index is None``): a generation in progress then was cut short (an exception
            or Ctrl-C mid-call), and the hooks start afresh instead of going on from its step.
        steps_source: called at the first step of each generation to read ``T`` (``recache.enable`` passes the
            pipeline scheduler's number of timesteps).
    """

    budget: Budget | None = None
    mechanism: str = DEFAULT_MECHANISM
    policy: SchedulePlanner | None = None
    schedule: Schedule | None = None
    num_inference_steps: int | None = None
    steps_source: Callable[[], int | None] | None = field(default=None, repr=False)
    call_started: Callable[[], bool] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mechanism not in HOOK_MECHANISMS:
            raise RecacheError(f"mechanism {self.mechanism!r} cannot run as a diffusers hook; "
                               f"choose one of {', '.join(HOOK_MECHANISMS)}")
        if self.budget is None and self.schedule is None:
            raise RecacheError("give a budget (k, a fraction of the steps, or a speed-up like '4x') or a schedule")
        if self.schedule is not None and self.policy is not None:
            raise RecacheError("give a policy or a fixed schedule, not both")
        if self.policy is not None and self.policy.mechanism != self.mechanism:
            raise RecacheError(f"the policy was trained for mechanism {self.policy.mechanism!r}, "
                               f"not {self.mechanism!r}")
        if self.budget is not None:
            check_budget_form(self.budget)
        if self.num_inference_steps is not None:
            self.plan(self.num_inference_steps)  # a budget that cannot run is refused now, not at the first call
        if self.schedule is not None:
            self.plan(self.schedule.T)

    def plan(self, T: int) -> Schedule:
        """The schedule of a generation of ``T`` steps."""
        if self.schedule is not None:
            if self.schedule.T != T:
                raise RecacheError(f"the schedule is for T={self.schedule.T} steps, but this call runs {T}")
            if self.budget is not None and resolve_budget(self.budget, T) != self.schedule.k:
                raise RecacheError(f"budget {self.budget!r} asks for k={resolve_budget(self.budget, T)}, "
                                   f"the schedule has k={self.schedule.k}")
            return self.schedule
        k = resolve_budget(self.budget, T)
        return self.policy.schedule_for_steps(k, T) if self.policy is not None else Schedule.uniform(T, k)


@dataclass
class RecacheStats:
    """What the hooks did: one record per finished generation (per context: ``T``, planned ``k``, the computed
    steps and how many steps were cached), and the generation in progress."""

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


class _ContextState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.step, self.schedule, self.compute, self.mechanisms, self.has_e = 0, None, True, None, False
        self.h_in = self.e_in = None


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


def _pack(meta, h, e):
    """A block's output from the streams, in the order its class returns them."""
    if meta.return_encoder_hidden_states_index is None:
        return h
    out = [None, None]
    out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = h, e
    return tuple(out)


class _BlockHook(ModelHook):
    """Runs the block when the step computes, else passes its inputs through; the tail block records the residual."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, is_tail: bool):
        super().__init__()
        self.state_manager, self.is_tail = state_manager, is_tail

    def initialize_hook(self, module):
        self.meta = TransformerBlockRegistry.get(type(module))
        return module

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.state_manager.get_state()
        if not st.compute:
            out = _pack(self.meta, *_io(self.meta, args, kwargs))
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                self._record(st, out)
        if self.is_tail:
            st.step += 1
        return out

    def _record(self, st: _ContextState, out) -> None:
        out = out if isinstance(out, tuple) else (out,)
        h_out = out[self.meta.return_hidden_states_index]
        st.mechanisms["h"].record(st.step, slice(None), st.h_in, h_out)
        if self.meta.return_encoder_hidden_states_index is not None and st.e_in is not None:
            e_out = out[self.meta.return_encoder_hidden_states_index]
            if e_out is not None:  # SD3's last block returns no text stream
                st.mechanisms["e"].record(st.step, slice(None), st.e_in, e_out)
                st.has_e = True


class _HeadHook(_BlockHook):
    """First block: starts a generation (step count, schedule, fresh mechanism state), decides compute or cache,
    and advances the step."""

    def __init__(self, state_manager: StateManager, config: RecacheHookConfig, stats: RecacheStats, is_tail: bool):
        super().__init__(state_manager, is_tail)
        self.config, self.stats = config, stats

    def reset_state(self, module):
        self.stats.finish()
        return super().reset_state(module)

    def _start(self, st: _ContextState, rows: int) -> None:
        ctx = self.state_manager.context
        T = (ctx.num_inference_steps or (self.config.steps_source() if self.config.steps_source else None)
             or self.config.num_inference_steps)
        T = T or (self.config.schedule.T if self.config.schedule is not None else None)
        if not T:
            raise RecacheError("cannot tell how many steps this call runs: pass num_inference_steps to "
                               "RecacheHookConfig (or use recache.enable on the pipeline)")
        st.schedule = self.config.plan(int(T))
        st.mechanisms = {"h": get_mechanism(self.config.mechanism), "e": get_mechanism(self.config.mechanism)}
        for mechanism in st.mechanisms.values():
            mechanism.reset(rows, st.schedule.T)
        if ctx.name in self.stats.current:  # a transformer driven directly: the previous generation is over
            self.stats.finish()
        self.stats.current[ctx.name] = {"T": st.schedule.T, "k": st.schedule.k, "computed_steps": [], "cached_steps": 0,
                                        "source": st.schedule.metadata.get("source", "schedule")}

    @torch.compiler.disable
    def _decide(self, st: _ContextState, rows: int) -> bool:
        if st.schedule is not None and 0 < st.step < st.schedule.T and self._new_call():
            self.stats.current[self.state_manager.context.name]["cut_short"] = True
            st.reset()
        if st.schedule is not None and st.step == st.schedule.T:
            st.reset()
        if st.schedule is None:
            self._start(st, rows)
        st.compute = st.schedule.mask[st.step]
        record = self.stats.current[self.state_manager.context.name]
        if st.compute:
            record["computed_steps"].append(st.step)
        else:
            record["cached_steps"] += 1
        return st.compute

    def _new_call(self) -> bool:
        return self.config.call_started is not None and bool(self.config.call_started())

    def new_forward(self, module, *args, **kwargs):
        st = self.state_manager.get_state()
        h, e = _io(self.meta, args, kwargs)
        compute = self._decide(st, h.shape[0])
        if compute:
            # clone: a block may write its input in place
            st.h_in, st.e_in = h.clone(), (e.clone() if e is not None else None)
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                self._record(st, out)
        else:
            h = st.mechanisms["h"].cached_pass(st.step, slice(None), h, None, ())
            if e is not None and st.has_e:
                e = st.mechanisms["e"].cached_pass(st.step, slice(None), e, None, ())
            out = _pack(self.meta, h, e)
        if self.is_tail:
            st.step += 1
        return out


def pipeline_steps(pipe) -> Callable[[], int | None] | None:
    """A ``steps_source`` for a pipeline: the number of timesteps its scheduler was set to for the running call."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return None
    return lambda: len(scheduler.timesteps) if getattr(scheduler, "timesteps", None) is not None else None


def pipeline_call_started(pipe) -> Callable[[], bool] | None:
    """A ``call_started`` for a pipeline whose scheduler counts its steps (``step_index``, None until the call's
    first ``scheduler.step``); None for one that does not."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "step_index"):
        return None
    return lambda: scheduler.step_index is None


def apply_recache(transformer: torch.nn.Module, config: RecacheHookConfig) -> RecacheStats:
    """Register the recache hooks on a supported diffusers transformer (FLUX, Wan 2.1, SD3); returns the stats object
    the hooks fill (``recache.summary`` reads it). Everything is checked before the model is touched."""
    blocks = transformer_blocks(transformer)
    if is_recache_enabled(transformer):
        raise RecacheError("recache is already enabled on this transformer; disable it first "
                           "(recache.disable / remove_recache)")
    if getattr(transformer, "is_cache_enabled", False):
        raise RecacheError("a diffusers cache is enabled on this transformer; call transformer.disable_cache() first "
                           "(one cache at a time)")
    if config.policy is not None and config.policy.model != model_fingerprint(transformer):
        raise RecacheError(f"the policy was trained for model {config.policy.model!r}, "
                           f"not {model_fingerprint(transformer)!r}")
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise RecacheError(f"block class {type(block).__name__} is not registered with diffusers' "
                               "TransformerBlockRegistry") from None
    state_manager, stats = _StateManager(_ContextState), RecacheStats(config.mechanism)
    head = _HeadHook(state_manager, config, stats, is_tail=len(blocks) == 1)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(head, _HEAD_HOOK)
    for i, block in enumerate(blocks[1:], start=1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            _BlockHook(state_manager, i == len(blocks) - 1), _BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    if hasattr(type(transformer), "is_cache_enabled"):  # registered as the model's cache: diffusers' enable_cache
        transformer._cache_config = config  # now refuses a second cache, as apply_recache refuses one of diffusers'
    return stats


def _head_hook(transformer: torch.nn.Module) -> _HeadHook | None:
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_HEAD_HOOK) is not None:
            return registry.get_hook(_HEAD_HOOK)
    return None


def is_recache_enabled(transformer: torch.nn.Module) -> bool:
    return _head_hook(transformer) is not None


def recache_stats(transformer: torch.nn.Module) -> RecacheStats | None:
    head = _head_hook(transformer)
    return head.stats if head is not None else None


def recache_config(transformer: torch.nn.Module) -> RecacheHookConfig | None:
    head = _head_hook(transformer)
    return head.config if head is not None else None


def reset_recache(transformer: torch.nn.Module) -> None:
    """Start a new generation on every context (what a pipeline does at the end of each call)."""
    head = _head_hook(transformer)
    if head is not None:
        head.reset_state(transformer)


def remove_recache(transformer: torch.nn.Module) -> None:
    """Remove the hooks; the transformer computes exactly as before ``apply_recache``."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in (_HEAD_HOOK, _BLOCK_HOOK):
                registry.remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    if isinstance(getattr(transformer, "_cache_config", None), RecacheHookConfig):
        transformer._cache_config = None
