"""Reliability: NaN and inf are caught with the step where they arose; damaged schedule and policy files, whatever
the damage, give a ``RecacheError`` (never another exception, a crash or a hang)."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_diffusers import tiny_flux_pipeline

from recache.errors import NonFiniteError, RecacheError
from recache.io import read_jsonl
from recache.mechanisms import get_mechanism
from recache.policies import training
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.policies.reinforce import TrainConfig
from recache.policies.training import train_recache
from recache.sampling.diffusers_rollouts import DiffusersRollouts
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


@pytest.fixture(scope="module")
def pipe():
    return DigitPipeline.from_pretrained("mnist-dit", steps=8)


def _poison_call(module, at: int):
    """A forward hook that turns the ``at``-th output (0-based) of ``module`` into NaN."""
    calls = []

    def hook(mod, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == at + 1 else output

    return module.register_forward_hook(hook)


def test_a_nan_in_uncached_sampling_is_reported_with_its_step(pipe):
    handle = _poison_call(pipe.model.blocks[0], at=3)  # one block call per step (both CFG branches in one batch)
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN or inf\) in sample rows \[0, 1\], "
                                                 r"first at sampler step 3 of 8"):
            pipe(torch.tensor([2, 5]), [0, 1])
    finally:
        handle.remove()
    assert torch.isfinite(pipe(torch.tensor([2, 5]), [0, 1])).all()


def test_a_nan_in_batched_rollouts_names_the_row_and_step(pipe):
    masks = torch.ones(2, 8, dtype=torch.bool)
    masks[1, 1:] = False  # row 1 computes step 0 only: the blocks' 4th call is row 0's step 3, alone
    handle = _poison_call(pipe.model.blocks[0], at=3)
    try:
        with pytest.raises(NonFiniteError, match=r"in sample row \[0\], first at sampler step 3 of 8"):
            pipe.rollout_rows(torch.tensor([2, 5]), [0, 1], masks, get_mechanism("reuse"))
    finally:
        handle.remove()


def test_a_nan_in_a_diffusers_pipeline_is_reported_with_its_step():
    flux = tiny_flux_pipeline()
    flux.set_progress_bar_config(disable=True)
    rollouts = DiffusersRollouts(flux, [{"prompt": "a cat"}], steps=6,
                                 call_kwargs={"height": 32, "width": 32, "max_sequence_length": 16})

    def poison(mod, args, output):
        # a FLUX block: two streams
        return tuple(o * float("nan") for o in output) if flux.scheduler.step_index == 2 else output

    handle = flux.transformer.transformer_blocks[0].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError,
                           match=r"transformer's output at sampler step 2 of 6, for prompt 'a cat' with seed 7"):
            rollouts([0], [7])
    finally:
        handle.remove()


class NaNReward:
    """The real reward, with the second row's reward made NaN."""

    def __init__(self, real):
        self.real = real

    def features(self, images):
        return self.real.features(images)

    def __call__(self, *args):
        parts = dict(self.real(*args))
        parts["reward"] = parts["reward"].clone()
        parts["reward"][1] = float("nan")
        return parts


def test_a_nan_reward_stops_training_with_the_update_and_pair(pipe, tmp_path, monkeypatch):
    real = training.reward_for
    monkeypatch.setattr(training, "reward_for", lambda *args, **kwargs: NaNReward(real(*args, **kwargs)))
    config = TrainConfig(mechanism="reuse", k_min=2, k_max=5, updates=2, pairs=2, group=2, pool=4)
    with pytest.raises(NonFiniteError, match=r"non-finite reward nan at update 0 for condition \d, seed \d"):
        train_recache(config, tmp_path, pipe, progress=False)


# --- fuzzing artefact files ----------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10 ** 30), 10 ** 30) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


def _dump(data) -> str:
    return json.dumps(data, allow_nan=True)


def damaged_json(valid: dict):
    """A valid artefact dict, damaged one way: a value replaced, a key dropped or added, or the text cut short."""
    keys = sorted(valid)
    replace = st.tuples(st.sampled_from(keys), JSON_VALUES).map(lambda kv: _dump({**valid, kv[0]: kv[1]}))
    drop = st.sampled_from(keys).map(lambda k: _dump({key: v for key, v in valid.items() if key != k}))
    extra = st.tuples(st.text(min_size=1, max_size=8), JSON_VALUES).map(lambda kv: _dump({**valid, kv[0]: kv[1]}))
    cut = st.integers(0, len(_dump(valid)) - 1).map(lambda n: _dump(valid)[:n])
    huge = st.sampled_from(["T", "k"]).map(lambda k: _dump({**valid, k: 10 ** 12}))
    deep = st.integers(1000, 100_000).map(lambda n: "[" * n + "]" * n)
    return replace | drop | extra | cut | huge | deep | st.binary(max_size=64).map(lambda b: b.decode("latin-1"))


SCHEDULE = Schedule.from_steps(12, [0, 3, 7], source="budcache", model="mnist-dit").to_dict()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=damaged_json(SCHEDULE))
def test_a_damaged_schedule_file_loads_whole_or_fails_clearly(tmp_path, text):
    path = tmp_path / "schedule.json"
    path.write_text(text, encoding="latin-1")
    try:
        schedule = Schedule.load(path)
    except RecacheError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert 1 <= schedule.k <= schedule.T <= 10_000 and schedule.mask[0] and len(schedule.steps) == schedule.k


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    policy = ReCachePolicy(ReCacheConfig(T=10, k_min=2, k_max=6, hidden=8))
    for p in policy.parameters():
        torch.nn.init.normal_(p)
    policy.save_pretrained(folder)
    return folder


POLICY_CONFIG = {"policy": "recache", **ReCacheConfig(T=10, k_min=2, k_max=6, hidden=8).__dict__}


def _loads_whole_or_fails_clearly(folder) -> None:
    """A policy folder gives a policy with finite weights and a schedule of exactly k for every budget, or one line."""
    try:
        policy = ReCachePolicy.from_pretrained(folder)
    except RecacheError as e:
        assert str(e) and "\n" not in str(e)
        return
    for k in range(policy.config.k_min, policy.config.k_max + 1):
        assert policy.schedule(k).k == k
    assert all(torch.isfinite(p).all() for p in policy.parameters())


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=damaged_json(POLICY_CONFIG))
def test_a_damaged_policy_config_loads_whole_or_fails_clearly(policy_folder, tmp_path, text):
    folder = tmp_path / "p"
    shutil.copytree(policy_folder, folder, dirs_exist_ok=True)
    (folder / "config.json").write_text(text, encoding="latin-1")
    _loads_whole_or_fails_clearly(folder)


def _weights_damage():
    def retype(dtype):
        return lambda state: {k: v.to(dtype) for k, v in state.items()}

    def poison(value):
        def edit(state):
            name = sorted(state)[0]
            return {**state, name: torch.full_like(state[name], value)}
        return edit

    tensor_edits = st.sampled_from([
        retype(torch.float64), retype(torch.float16), retype(torch.int32), retype(torch.bool),
        poison(math.nan), poison(math.inf),
        lambda s: {**s, "extra.weight": torch.zeros(3)},
        lambda s: {k: v for k, v in s.items() if k != "mlp.0.bias"},
        lambda s: {**s, "mlp.0.weight": torch.zeros(5, 5)},
        lambda s: {k: v.reshape(-1) for k, v in s.items()},
    ]).map(lambda edit: ("tensors", edit))
    cut = st.integers(0, 2000).map(lambda n: ("cut", n))
    header = st.integers(0, 2 ** 64 - 1).map(lambda n: ("header", n))  # the 8-byte header length claims any size
    flip = st.tuples(st.integers(0, 4000), st.integers(1, 255)).map(lambda t: ("flip", t))
    return tensor_edits | cut | header | flip


@settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=_weights_damage())
def test_damaged_policy_weights_load_whole_or_fail_clearly(policy_folder, tmp_path, damage):
    folder = tmp_path / "p"
    shutil.copytree(policy_folder, folder, dirs_exist_ok=True)
    weights = folder / "model.safetensors"
    kind, how = damage
    data = bytearray(weights.read_bytes())
    if kind == "tensors":
        save_file({k: v.contiguous() for k, v in how(load_file(weights)).items()}, weights)
    elif kind == "cut":
        weights.write_bytes(bytes(data[: how % len(data)]))
    elif kind == "header":
        weights.write_bytes(struct.pack("<Q", how) + bytes(data[8:]))
    else:
        at, xor = how
        data[at % len(data)] ^= xor
        weights.write_bytes(bytes(data))
    _loads_whole_or_fails_clearly(folder)


# --- interrupted runs ---------------------------------------------------------------------------------------------

TRAIN_ARGV = [sys.executable, "-m", "recache", "train", "--trainer", "reinforce", "--steps", "8", "--k-min", "2",
              "--k-max", "5", "--updates", "40", "--pairs", "2", "--group", "3", "--pool", "4", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(out, *extra, check=True):
    return subprocess.run([*TRAIN_ARGV, "--out", str(out), *extra], env=ENV, capture_output=True, text=True,
                          timeout=300, check=check)


def _checkpoint_step(folder) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / training.CHECKPOINT), framework="pt") as f:
        return json.loads(f.metadata()["recache"])["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "whole"
    _train(out)
    return out


def _stopped_run(out, sig) -> tuple[subprocess.Popen, str, int, int]:
    """A training run sent ``sig`` once it has checkpointed 3 updates: the process, its stderr, the updates logged
    before the signal and those in its checkpoint after."""
    # SIGINT as a terminal delivers it: a shell that starts a job in the background makes it ignore SIGINT
    proc = subprocess.Popen([*TRAIN_ARGV, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ((out / training.CHECKPOINT).exists() and len(read_jsonl(out / training.LOG)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the training did not start"
        time.sleep(0.02)
    done_before = len(read_jsonl(out / training.LOG))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc, err, done_before, _checkpoint_step(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_run_stopped_mid_training_resumes_to_the_same_policy(uninterrupted, tmp_path, sig):
    # An update takes about 50 ms: on a loaded machine the signal can land after the last one. Such a run was not
    # stopped mid-way, so it is tried again (at most 3 times) rather than counted.
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        proc, err, done_before, step = _stopped_run(out, sig)
        if step < 40:
            break
    # Ctrl-C keeps every finished update; a SIGKILL between the log's write and the checkpoint's loses that one update
    lost_at_most = 0 if sig == signal.SIGINT else 1
    assert done_before - lost_at_most <= step < 40  # it stopped mid-run
    logged = [row["update"] for row in read_jsonl(out / training.LOG)]
    assert logged[:step] == list(range(step)) and len(logged) - step <= lost_at_most
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in err
        assert (f"interrupted; the checkpoint {out / training.CHECKPOINT} holds {step} updates: "
                "resume with --resume" in err)
    if sig == signal.SIGINT:  # Ctrl-C leaves no temporary file; a SIGKILL mid-write can, and the resume removes it
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    _train(out, "--resume")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert [row["update"] for row in read_jsonl(out / training.LOG)] == list(range(40))
    for name, value in load_file(uninterrupted / "policy/model.safetensors").items():
        assert torch.equal(value, load_file(out / "policy/model.safetensors")[name]), name
    assert read_jsonl(out / training.LOG)[-1]["reward"] == read_jsonl(uninterrupted / training.LOG)[-1]["reward"]


# --- same seed, same results --------------------------------------------------------------------------------------


def test_search_and_evaluation_repeat_exactly(pipe, tmp_path):
    from recache.evaluation.compare import run_comparison
    from recache.evaluation.evaluate import Method
    from recache.policies.budcache import SearchConfig, search_schedule

    config = SearchConfig(k=3, pairs=2, sa_iters=12, hc_iters=2, seed=4)
    first, second = (search_schedule(config, pipe, tmp_path / run, progress=False) for run in ("a", "b"))
    assert first[0].mask == second[0].mask and first[1] == second[1]  # every loss, bit for bit
    methods = [Method("uniform", "taylorseer", 3, Schedule.uniform(8, 3)), Method("searched", "reuse", 3, first[0])]
    classes, seeds = torch.arange(4), [900_000 + i for i in range(4)]
    rows = [run_comparison(pipe, methods, tmp_path / f"eval{i}", classes, seeds, timing_runs=0, progress=False)["rows"]
            for i in range(2)]
    assert rows[0] == rows[1]
