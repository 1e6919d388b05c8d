"""Every row of the bad-input table in docs/reliability.md, run as written: exit status 2, the row's message on one
line of stderr, no traceback, no file left behind."""

import json
import os
import pickle
import re
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recache.checkpoint import save_checkpoint
from recache.cli import main
from recache.models.pretrained import WEIGHTS_DIR
from recache.policies import cost_table
from recache.policies.pretrained import PRETRAINED_DIR
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.policies.reinforce import TrainConfig
from recache.schedule import Schedule

DOC = Path(__file__).parent.parent / "docs" / "reliability.md"
V1_POLICY = Path(__file__).parent / "fixtures" / "policy-v1-taylorseer"  # a v1 policy as shipped before v2
ROW = re.compile(r"^\| (?P<input>[^|]+) \| (?P<bad>[^|]+) \| `(?P<command>recache [^`]+)` \| `(?P<message>[^`]+)` \|$")


def table_rows() -> list[tuple[str, str]]:
    rows = [(m["command"], m["message"]) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 40, "the bad-input table of docs/reliability.md was not found"
    return rows


def _policy_copy(folder: Path, edit_config=None, edit_tensors=None) -> None:
    shutil.copytree(V1_POLICY, folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        save_file(edit_tensors(load_file(folder / "model.safetensors")), folder / "model.safetensors")


def _nan_first(tensors: dict) -> dict:
    name = sorted(tensors)[0]
    return {**tensors, name: torch.full_like(tensors[name], float("nan"))}


def make_bad_policies(root: Path) -> None:
    """The damaged policy folders of the table: copies of a v1 policy (and one of a shipped v2 one), each broken."""
    _policy_copy(root / "nan-policy", edit_tensors=_nan_first)
    _policy_copy(root / "int-policy", edit_tensors=lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    _policy_copy(root / "cut-policy")
    data = (root / "cut-policy" / "model.safetensors").read_bytes()
    (root / "cut-policy" / "model.safetensors").write_bytes(data[: len(data) // 2])
    _policy_copy(root / "wide-policy", edit_config=lambda c: c.update(hidden=10 ** 9))
    _policy_copy(root / "extra-key-policy", edit_config=lambda c: c.update(surprise=1))
    _policy_copy(root / "pickle-policy")
    _policy_copy(root / "v1-policy")
    shutil.copytree(PRETRAINED_DIR / "mnist-dit-taylorseer", root / "v2-damaged-policy")
    v2 = json.loads((root / "v2-damaged-policy" / "config.json").read_text())
    (root / "v2-damaged-policy" / "config.json").write_text(json.dumps({**v2, "settings": [{"T": 1, "shift": 1.0}]}))
    (root / "pickle-policy" / "model.safetensors").write_bytes(pickle.dumps({"mlp.0.weight": [1.0, 2.0]}))


def make_bad_files(root: Path) -> None:
    """The damaged files and folders the table's commands name."""
    mask = [1] + [0] * 49
    (root / "a-folder").mkdir()
    (root / "truncated.json").write_text('{"format": "recache.schedule/v1", "T": 50, "mask": [1, 0')
    (root / "nan-mask.json").write_text(json.dumps({"mask": [1, float("nan")] + [0] * 48}))
    Schedule.from_steps(20, [0, 5, 10]).save(root / "t20.json")
    (root / "no-step-0.json").write_text(json.dumps({"mask": [0, 1] + [0] * 48}))
    (root / "huge-T.json").write_text(json.dumps({"T": 10 ** 9, "mask": mask}))
    (root / "deep.json").write_text("[" * 1_000_000 + "]" * 1_000_000)
    (root / "broken-model").mkdir()
    (root / "broken-model" / "config.json").write_text("{not json")
    shutil.copytree(WEIGHTS_DIR / "mnist-dit", root / "nan-model")
    save_file(_nan_first(load_file(root / "nan-model" / "model.safetensors")), root / "nan-model" / "model.safetensors")
    make_bad_policies(root)
    policy = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=4))
    save_checkpoint(root / "old-run" / "checkpoint.safetensors", {"policy": policy},
                    torch.optim.Adam(policy.parameters()), {"train": torch.Generator()}, 1,
                    {"config": asdict(TrainConfig(k_min=2, k_max=4)), "ranks": 1})
    (root / "corrupt-run").mkdir()
    (root / "corrupt-run" / "checkpoint.safetensors").write_bytes(b"\x07not a checkpoint")
    (root / "old-search").mkdir()
    (root / "old-search" / "memo.jsonl").write_text('{"steps": [0, 4, 7], "loss": 0.1}\n')
    (root / "bad-sigmas.json").write_text(json.dumps({"mask": mask, "aligned_sigmas": [7] * 51}))
    Schedule.from_steps(50, [0, 10, 30]).save(root / "t50.json")
    (root / "a-file.txt").write_text("")
    _policy_copy(root / "missing-field-policy", edit_config=lambda c: c.pop("k_min"))
    _policy_copy(root / "bad-mechanism-policy", edit_config=lambda c: c.update(mechanism="magic"))
    for name, edit in (("wide-model", lambda c: c["config"].update(hidden_size=10 ** 6)),
                       ("text-guidance-model", lambda c: c.setdefault("sampling", {}).update(guidance="abc"))):
        shutil.copytree(WEIGHTS_DIR / "mnist-dit", root / name)
        config = json.loads((root / name / "config.json").read_text())
        edit(config)
        (root / name / "config.json").write_text(json.dumps(config))
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in policy.state_dict().items()}
    nan_policy = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=4))
    nan_policy.load_state_dict(nan_state)
    save_checkpoint(root / "nan-run" / "checkpoint.safetensors", {"policy": nan_policy},
                    torch.optim.Adam(nan_policy.parameters()), {"train": torch.Generator()}, 1,
                    {"config": asdict(TrainConfig(k_min=2, k_max=4)), "ranks": 1})
    sampler = {"model": "mnist-dit", "T": 8, "sigmas": "linear", "guidance": 2.0}
    save_checkpoint(root / "sampler-run" / "checkpoint.safetensors", {"policy": policy},
                    torch.optim.Adam(policy.parameters()), {"train": torch.Generator()}, 1,
                    {"config": asdict(TrainConfig(k_min=2, k_max=4)), "ranks": 1, "sampler": sampler})
    (root / "settings-search").mkdir()
    (root / "settings-search" / "memo.jsonl").write_text('{"steps": [0, 4, 7], "loss": 0.1}\n')
    (root / "settings-search" / "search.json").write_text(json.dumps({"search": {"k": 3, "mechanism": "taylorseer"}}))
    (root / "prompts.txt").write_text("3\n")
    (root / "empty.txt").write_text("")
    (root / "gap.txt").write_text("3\n\n7\n")
    (root / "words.txt").write_text("a cat\n")
    (root / "bad.jsonl").write_text('{"prompt": "1"}\n{not json\n')
    make_misused_files(root)


def make_misused_files(root: Path) -> None:
    """Files for misuse that used to succeed with a wrong answer, or to block, grow or replace something."""
    mask = [1] + [0] * 49
    Schedule.from_steps(50, [0, 10, 30], mechanism="taylorseer", sigmas="linear").save(root / "taylorseer-k3.json")
    (root / "two-masks.json").write_text('{"mask": ' + json.dumps(mask) + ', "mask": ' + json.dumps(mask) + "}")
    (root / "future-format.json").write_text(json.dumps({"format": "recache.schedule/v9", "mask": mask}))
    (root / "bigint.json").write_text('{"T": ' + "9" * 5000 + ', "mask": ' + json.dumps(mask) + "}")
    (root / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.json")
    _policy_copy(root / "mixed-mechanism-policy", edit_config=lambda c: c["training"].update(mechanism="reuse"))
    _policy_copy(root / "reshaped-policy",
                 edit_tensors=lambda t: {**t, "mlp.0.weight": t["mlp.0.weight"][:, :3].contiguous()})
    _policy_copy(root / "device-policy")
    (root / "device-policy" / "model.safetensors").unlink()
    (root / "device-policy" / "model.safetensors").symlink_to("/dev/zero")
    (root / "eval-t10").mkdir()
    row = {"policy": "uniform", "mechanism": "reuse", "T": 10, "k": 3, "class": 0, "seed": 900000, "full_passes": 3,
           "model": "mnist-dit", "sigmas": "linear", "guidance": 2.0}
    (root / "eval-t10" / "rows.jsonl").write_text(json.dumps(row) + "\n")
    (root / "zero-eval").mkdir()
    (root / "zero-eval" / "rows.jsonl").symlink_to("/dev/zero")
    shutil.copytree(WEIGHTS_DIR / "mnist-classifier", root / "finished-classifier")
    policy = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=4))
    save_checkpoint(root / "three-updates-run" / "checkpoint.safetensors", {"policy": policy},
                    torch.optim.Adam(policy.parameters()), {"train": torch.Generator()}, 3,
                    {"config": asdict(TrainConfig(k_min=2, k_max=4)), "ranks": 1})
    identity = {"model": "mnist-dit", "T": 8, "sigmas": "linear", "guidance": 2.0, "mechanism": "reuse", "pairs": 4}
    cost_table._save(root / "reuse-table" / cost_table.TABLE, torch.zeros(9, 9, dtype=torch.float64),
                     torch.ones(9, 9, dtype=torch.bool), identity)
    (root / "damaged-table").mkdir()
    (root / "damaged-table" / cost_table.TABLE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a table")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_bad_files(root)
    return root


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("command, message", table_rows())
def test_bad_input_gets_its_one_line_message(bad_files, monkeypatch, capsys, command, message):
    monkeypatch.chdir(bad_files)
    before = _tree(bad_files)
    try:
        status = main(shlex.split(command)[1:])
    except SystemExit as e:  # argparse rejects a flag's value before any command runs
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert _tree(bad_files) == before  # nothing written, nothing half-written
