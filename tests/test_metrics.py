import math

import pytest
import torch

from recache.metrics import mean_and_se, paired_difference, psnr, relative_l2, ssim
from recache.metrics.fidelity import PSNR_CAP_DB


def test_identical_images():
    x = torch.rand(3, 1, 20, 20) * 2 - 1
    assert torch.equal(relative_l2(x, x), torch.zeros(3))
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB))
    torch.testing.assert_close(ssim(x, x), torch.ones(3))


def test_known_values():
    ref = torch.ones(2, 1, 4, 4)
    x = ref.clone()
    x[1] *= 0.5
    torch.testing.assert_close(relative_l2(x, ref), torch.tensor([0.0, 0.5]))
    # [-1, 1] -> [0, 1]: 1 -> 1 and 0.5 -> 0.75, so MSE = 0.0625 and PSNR = 10 log10(1 / 0.0625)
    assert psnr(x, ref)[1].item() == pytest.approx(10 * math.log10(16), rel=1e-5)
    assert ssim(torch.rand(2, 1, 20, 20), torch.rand(2, 1, 20, 20)).max() < 0.5


def test_paired_difference():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.5, 2.0, 4.0])
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(torch.tensor([0.5, 0.5, 1.0, 0.0]).std().item() / 2)
    assert mean_and_se(torch.tensor([2.0])) == (2.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:2])
