"""Every diffusers transformer whose blocks diffusers registers, built tiny and offline (``tiny_zoo``), driven
directly: supported ones cache exactly, the others are refused in one line naming them. No class name is listed in
recache; the expectations below are the test's own."""

from __future__ import annotations

import pytest
import torch
from tiny_zoo import ZOO, tiny_euler

import recache
from recache.errors import RecacheError, RecacheWarning
from recache.hooks.schedule_cache import is_recache_enabled
from recache.hooks.transformers import transformer_blocks

T = 6
# What keeps these from being one residual stack, as the refusal says it (checked before any block runs, or on the
# first call for what only running shows).
REFUSED = {
    "Flux2Transformer2DModel": "some of its blocks carry the text stream apart",
    "ZImageTransformer2DModel": "with the argument",
    "LatteTransformer3DModel": "interleaves spatial and temporal block lists",
    "BriaTransformer2DModel": "BriaSingleTransformerBlock are not registered",
}
REFUSED_ON_FIRST_CALL = {
    "MotifVideoTransformer3DModel": "its blocks turn the text stream",
}
SUPPORTED = [name for name in ZOO if name not in REFUSED and name not in REFUSED_ON_FIRST_CALL]


def block_work(transformer) -> list[int]:
    """How many attention layers inside the block stack ran: a fixed number per block run, whatever the class."""
    from diffusers.hooks._common import _ATTENTION_CLASSES

    count = [0]
    layers = [m for block in transformer_blocks(transformer) for m in block.modules()
              if isinstance(m, _ATTENTION_CLASSES)]
    assert layers, "no attention layer to count"
    for layer in layers:
        layer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


class Interrupted(Exception):
    pass


def run_after_an_interruption(transformer, name: str) -> torch.Tensor:
    """A generation stopped by an error raised inside the first block at its second run, then a whole one (which
    ends the one cut short, and says so); the whole one's output."""
    runs = [0]

    def stop(*_):
        runs[0] += 1
        if runs[0] == 2:
            raise Interrupted

    handle = transformer_blocks(transformer)[0].register_forward_pre_hook(stop)
    try:
        with pytest.raises(Interrupted):
            tiny_euler(transformer, name, T)
    finally:
        handle.remove()
    with pytest.warns(RecacheWarning, match="of the T=6 steps its plan was made for"):
        return tiny_euler(transformer, name, T)


@pytest.mark.parametrize("name", SUPPORTED)
def test_each_supported_transformer_caches_exactly_and_restores(name):
    transformer = ZOO[name].build(0)
    reference = tiny_euler(transformer, name, T)
    work = block_work(transformer)
    tiny_euler(transformer, name, T)
    per_step, work[0] = work[0] // T, 0
    recache.enable(transformer, budget=T, num_inference_steps=T)
    assert torch.equal(tiny_euler(transformer, name, T), reference)
    recache.disable(transformer)
    recache.enable(transformer, budget=3, num_inference_steps=T)
    try:
        work[0] = 0
        cached = tiny_euler(transformer, name, T)
        assert work[0] == 3 * per_step > 0  # exactly k block-stack runs
        assert recache.summary(transformer).full_passes in ({"cond": 3}, {"default": 3})
        error = ((cached - reference).norm() / reference.norm()).item()
        assert 0 < error < 1, error
        assert torch.equal(run_after_an_interruption(transformer, name), cached)  # the next call is clean
    finally:
        recache.disable(transformer)
    assert torch.equal(tiny_euler(transformer, name, T), reference)  # disable restores the model bit for bit


@pytest.mark.parametrize("name", list(REFUSED))
def test_transformers_that_are_not_one_residual_stack_are_refused_before_anything_runs(name):
    transformer = ZOO[name].build(0)
    with pytest.raises(RecacheError, match=f"transformer {name} is not supported: .*{REFUSED[name]}"):
        recache.enable(transformer, budget=3, num_inference_steps=T)
    assert not is_recache_enabled(transformer)


@pytest.mark.parametrize("name", list(REFUSED_ON_FIRST_CALL))
def test_a_stack_that_changes_a_stream_is_refused_on_its_first_call_and_unhooked(name):
    transformer = ZOO[name].build(0)
    reference = tiny_euler(transformer, name, T)
    recache.enable(transformer, budget=3, num_inference_steps=T)
    with pytest.raises(RecacheError, match=f"transformer {name} is not supported: {REFUSED_ON_FIRST_CALL[name]}"):
        tiny_euler(transformer, name, T)
    assert not is_recache_enabled(transformer)
    assert torch.equal(tiny_euler(transformer, name, T), reference)


def test_a_transformer_of_ones_own_is_supported_by_registering_its_block_class():
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, temb):
            return hidden_states + self.mlp(hidden_states + temb)

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, hidden_states, timestep):
            temb = timestep[:, None, None] / 1000
            for block in self.blocks:
                hidden_states = block(hidden_states, temb)
            return (hidden_states,)

    model = Denoiser()
    with pytest.raises(RecacheError, match="transformer Denoiser is not supported: .*register its block class"):
        recache.enable(model, budget=2, num_inference_steps=4)
    TransformerBlockRegistry.register(Block, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                      return_encoder_hidden_states_index=None))
    recache.enable(model, budget=2, num_inference_steps=4)
    x = torch.randn(2, 3, 8)
    for t in (1000.0, 750.0, 500.0, 250.0):
        with torch.no_grad():
            x = x - 0.25 * model(x, torch.full((2,), t))[0]
    assert recache.summary(model).full_passes == {"default": 2}
    recache.disable(model)
