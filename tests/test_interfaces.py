"""The seams the architecture pass declared: the sampler interface, the schedule planner the hooks take, mechanism
capabilities, the one step dispatch and the one JSONL reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_diffusers import euler_loop, tiny_flux_transformer, transformer_inputs

from recache.hooks import RecacheHookConfig, apply_recache, model_fingerprint
from recache.hooks.transformers import transformer_blocks
from recache.io import read_jsonl, write_jsonl
from recache.mechanisms import HOOK_MECHANISMS, MECHANISMS, Uncached, get_mechanism
from recache.policies import load_policy
from recache.sampling.cached import sample_cached
from recache.sampling.diffusers_rollouts import DiffusersRollouts
from recache.sampling.interface import OnlineSampler, Sampler
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import get_sigmas
from recache.schedule import Schedule, SchedulePlanner


def test_both_samplers_implement_the_sampler_interface(tiny_dit):
    digits = DigitPipeline(tiny_dit, get_sigmas("linear", 6), 2.0)
    assert isinstance(digits, OnlineSampler) and isinstance(digits, Sampler)
    assert digits.condition_texts() == [str(c) for c in range(10)] and digits.outputs_digits
    from tiny_diffusers import tiny_flux_pipeline

    rollouts = DiffusersRollouts(tiny_flux_pipeline(), [{"prompt": "a cat"}, {"prompt": "a dog"}], steps=4)
    assert isinstance(rollouts, Sampler) and not isinstance(rollouts, OnlineSampler)
    assert rollouts.condition_texts() == ["a cat", "a dog"] and not rollouts.outputs_digits


def test_hook_mechanisms_come_from_the_mechanisms_capabilities():
    assert HOOK_MECHANISMS == ("reuse", "taylorseer", "hicache")
    assert [name for name, m in MECHANISMS.items() if not m.fills_block_stack] == ["step-skip"]


class EveryOther:
    """A planner that is not a policy: computes steps 0, 2, 4, ... until k are placed."""

    def __init__(self, model: str):
        self.model, self.mechanism = model, "reuse"

    def schedule_for_steps(self, k: int, T: int) -> Schedule:
        return Schedule.from_steps(T, list(range(0, 2 * k, 2)), source="every-other")


def test_the_hooks_take_any_schedule_planner():
    transformer = tiny_flux_transformer()
    planner = EveryOther(model_fingerprint(transformer))
    assert isinstance(planner, SchedulePlanner)
    assert isinstance(load_policy("mnist-dit-taylorseer"), SchedulePlanner)
    assert isinstance(load_policy(Path(__file__).parent / "fixtures" / "policy-v1-taylorseer"), SchedulePlanner)
    inputs, T = transformer_inputs(transformer), 10
    stats = apply_recache(transformer, RecacheHookConfig(budget=4, mechanism="reuse", policy=planner,
                                                         num_inference_steps=T))
    euler_loop(transformer, T, inputs)
    assert stats.last["cond"]["computed_steps"] == [0, 2, 4, 6]
    assert stats.last["cond"]["source"] == "every-other" and len(transformer_blocks(transformer)) > 1


def test_the_uncached_sampler_is_the_dispatch_with_every_step_computed(tiny_dit):
    sigmas, noise, classes = get_sigmas("linear", 6), torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    reference, passes = sample_cached(tiny_dit, noise, sigmas, classes, guidance=2.0)
    assert passes.tolist() == [6, 6, 6]
    for name in MECHANISMS:  # a full schedule under any mechanism is the uncached sampler, bit for bit
        full = torch.ones(3, 6, dtype=torch.bool)
        out, passes = sample_cached(tiny_dit, noise, sigmas, classes, full, get_mechanism(name), guidance=2.0)
        assert torch.equal(out, reference) and passes.tolist() == [6, 6, 6], name
    uncached = Uncached()
    uncached.reset(2, 6)
    assert uncached.full_passes.tolist() == [0, 0]


def test_read_jsonl_skips_cut_and_damaged_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert read_jsonl(path) == []
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as f:
        f.write('[1, 2]\n{"a": \xff\nnot json\n' + json.dumps({"a": 3}) + "\n" + '{"a": 4')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
