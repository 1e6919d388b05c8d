import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from recache.models.dit import DiT, DiTConfig  # noqa: E402

TINY = DiTConfig(image_size=8, patch_size=4, hidden_size=16, depth=2, num_heads=2)


@pytest.fixture
def tiny_dit() -> DiT:
    """A randomly initialised tiny DiT whose blocks are not the identity (adaLN-Zero weights perturbed)."""
    torch.manual_seed(0)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def interrupt_at_checkpoint(monkeypatch):
    """``interrupt(module, n)``: the module's ``save_checkpoint`` saves as before, then raises KeyboardInterrupt on
    its ``n``-th call (a run stopped right after a checkpoint); ``module.save_checkpoint`` is restored afterwards."""

    def interrupt(module, n: int = 2):
        real, calls = module.save_checkpoint, []

        def save_then_die(*args, **kwargs):
            real(*args, **kwargs)
            calls.append(1)
            if len(calls) == n:
                monkeypatch.setattr(module, "save_checkpoint", real)
                raise KeyboardInterrupt

        monkeypatch.setattr(module, "save_checkpoint", save_then_die)

    return interrupt
