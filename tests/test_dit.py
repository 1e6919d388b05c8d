import pytest
import torch

from recache.models.dit import DIT_CONFIGS, DiT, DiTConfig
from tests.conftest import TINY


def test_forward_shape_and_stages(tiny_dit):
    x = torch.randn(3, 1, 8, 8)
    sigma, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 4, 10])
    v = tiny_dit(x, sigma, y)
    assert v.shape == x.shape
    h, c = tiny_dit.embed(x), tiny_dit.condition(sigma, y)
    assert h.shape == (3, 4, TINY.hidden_size) and c.shape == (3, 3 * TINY.hidden_size)
    for block in tiny_dit.blocks:
        h = block(h, c)
    torch.testing.assert_close(tiny_dit.final(h, c), v, rtol=0, atol=0)


def test_stages_equal_the_textbook_dit(tiny_dit):
    """Patchify + linear + position, and the final adaLN layer from precomputed shift and scale, equal the plain
    formulas: a token's pixels ordered (channel, row, column)."""
    torch.manual_seed(0)
    for p in tiny_dit.parameters():  # a model whose final layer and embedding are not zero
        torch.nn.init.normal_(p, std=0.2)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 4, 10])
    p, g, d = TINY.patch_size, TINY.image_size // TINY.patch_size, TINY.hidden_size
    patches = x.view(3, 1, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(3, g * g, p * p)
    h = tiny_dit.embed(x)
    torch.testing.assert_close(h, tiny_dit.patch_embed(patches) + tiny_dit.pos_embed, rtol=0, atol=1e-5)
    c = tiny_dit.condition(sigma, y)
    shift, scale = tiny_dit.final_layer.modulation(c[:, :d]).unsqueeze(1).chunk(2, dim=-1)
    tokens = tiny_dit.final_layer.linear(tiny_dit.final_layer.norm(h) * (1 + scale) + shift)
    image = tokens.view(3, g, g, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(3, 1, 8, 8)
    torch.testing.assert_close(tiny_dit.final(h, c), image, rtol=0, atol=1e-5)


def test_scalar_sigma_equals_broadcast_sigma(tiny_dit):
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    torch.testing.assert_close(tiny_dit(x, torch.tensor(0.3), y), tiny_dit(x, torch.full((4,), 0.3), y))


def test_condition_of_a_sigma_grid_equals_each_step(tiny_dit):
    sigmas, y = torch.linspace(1, 0.1, 5), torch.tensor([0, 3, 10])
    grid = tiny_dit.condition(sigmas.view(-1, 1), y)
    assert grid.shape == (5, 3, 3 * TINY.hidden_size)
    for i, sigma in enumerate(sigmas):
        torch.testing.assert_close(grid[i], tiny_dit.condition(sigma, y), rtol=0, atol=1e-6)


def test_adaln_zero_blocks_start_as_identity():
    model = DiT(TINY).eval()
    h = torch.randn(2, 4, TINY.hidden_size)
    c = torch.randn(2, TINY.hidden_size)
    for block in model.blocks:
        torch.testing.assert_close(block(h, c), h)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor(0.5), torch.tensor([1, 2])).abs().max() == 0


def test_patchify_keeps_pixels_in_their_patch():
    """A change in one pixel may only change the output of that pixel's token after embedding."""
    model = DiT(TINY).eval()
    x = torch.zeros(1, 1, 8, 8)
    x2 = x.clone()
    x2[0, 0, 5, 6] = 1.0  # row 5, column 6 -> token (1, 1) = index 3
    h1, h2 = model.embed(x), model.embed(x2)
    changed = (h1 - h2).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False, False, True]


def test_registry_configs_build():
    for name, config in DIT_CONFIGS.items():
        assert config.image_size % config.patch_size == 0, name
    assert DIT_CONFIGS["DiT-T/4"].depth >= 4


@pytest.mark.parametrize("kwargs, word", [({"image_size": 10, "patch_size": 4}, "patch_size"),
                                          ({"hidden_size": 30, "num_heads": 4}, "num_heads")])
def test_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DiTConfig(**kwargs)
