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
