import pytest
import torch

from recache.checkpoint import load_checkpoint, save_checkpoint
from recache.errors import RecacheError


def _run(model, opt, gen, steps):
    for _ in range(steps):
        x = torch.randn(8, 3, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1), torch.Generator().manual_seed(1)


def test_resume_equals_uninterrupted(tmp_path):
    model, opt, gen = _fresh()
    _run(model, opt, gen, 6)
    expected = model.weight.detach().clone()

    model, opt, gen = _fresh()
    _run(model, opt, gen, 3)
    save_checkpoint(tmp_path / "ck.safetensors", {"m": model}, opt, {"data": gen}, 3, {"note": [1, 2]})
    model, opt, gen = _fresh()
    step, extra = load_checkpoint(tmp_path / "ck.safetensors", {"m": model}, opt, {"data": gen})
    assert step == 3 and extra == {"note": [1, 2]}
    _run(model, opt, gen, 3)
    assert torch.equal(model.weight, expected)


def test_unreadable_checkpoint(tmp_path):
    model, opt, gen = _fresh()
    (tmp_path / "ck.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(RecacheError, match="cannot be read"):
        load_checkpoint(tmp_path / "ck.safetensors", {"m": model}, opt, {"data": gen})
