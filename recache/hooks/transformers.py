"""Which diffusers transformers the hooks support, their block stacks, and a fingerprint that names the model.

Support is found, not listed: a transformer is supported when its top-level block lists (the attribute names
diffusers' own block caches look for: ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``,
``layers``...) hold blocks whose class diffusers registers in ``TransformerBlockRegistry``, which says where each
block takes and returns its image and text streams. A transformer diffusers adds with registered blocks therefore
needs no code here; another can be made supported by registering its block class there.
"""

from __future__ import annotations

import hashlib
import inspect
import json

import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry

from recache.errors import RecacheError

# The denoisers a pipeline may hold, in the order it runs them (Wan 2.2: high-noise then low-noise expert).
DENOISER_NAMES = ("transformer", "transformer_2")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, or the module itself."""
    return getattr(module, "_orig_mod", module) if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) \
        else module


def denoisers_of(pipe_or_transformer) -> list[torch.nn.Module]:
    """The transformers of a pipeline (``pipe.transformer`` and, for Wan 2.2, ``pipe.transformer_2``), unwrapped
    from ``torch.compile``; or ``[the module itself]``."""
    found = [getattr(pipe_or_transformer, name, None) for name in DENOISER_NAMES]
    found = [unwrap(m) for m in found if isinstance(m, torch.nn.Module)]
    return found or [unwrap(pipe_or_transformer)]


def transformer_of(pipe_or_transformer) -> torch.nn.Module:
    """The first denoiser of a pipeline (the one its ``recache`` state and stats live on), or the module itself."""
    return denoisers_of(pipe_or_transformer)[0]


def _registered(block: torch.nn.Module) -> bool:
    try:
        TransformerBlockRegistry.get(type(block))
    except ValueError:
        return False
    return True


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the transformer's stack in the order its forward runs them: every top-level block list (by
    diffusers' block-list names, in the order the class defines them) whose blocks diffusers registers. Anything
    else is one clear error naming the class."""
    name = type(transformer).__name__
    lists = [(attr, child) for attr, child in transformer.named_children()
             if attr in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList) and len(child)]
    blocks = [block for _, child in lists for block in child if _registered(block)]
    if not blocks:
        raise RecacheError(f"transformer {name} is not supported: it has no block list whose blocks diffusers "
                           "registers in TransformerBlockRegistry (register its block class there to hook it)")
    unregistered = sorted({type(b).__name__ for _, child in lists for b in child if not _registered(b)})
    if unregistered:
        raise RecacheError(f"transformer {name} is not supported: its block class(es) {', '.join(unregistered)} are "
                           "not registered in diffusers' TransformerBlockRegistry (register them there to hook it)")
    _check_one_stack(name, [attr for attr, _ in lists], blocks)
    check_blocks_not_compiled(name, blocks)
    return blocks


def _check_one_stack(name: str, attrs: list[str], blocks: list[torch.nn.Module]) -> None:
    """What can be seen without running the model that keeps its blocks from being one residual stack: spatial and
    temporal lists run interleaved with reshapes between them (Latte); a registration naming an argument the
    block's forward does not take (Z-Image's blocks take ``x``); lists that carry the text stream apart in some
    blocks and joined to the image in others (FLUX.2). The rest (a stream that changes shape inside the stack) is
    checked on the first call (``schedule_cache``)."""
    if any(attr.startswith("temporal") for attr in attrs):
        raise RecacheError(f"transformer {name} is not supported: it interleaves spatial and temporal block lists "
                           f"({', '.join(attrs)}), which do not form one residual stack")
    metas = {type(b): TransformerBlockRegistry.get(type(b)) for b in blocks}
    for cls, meta in metas.items():
        takes = inspect.signature(cls.forward).parameters
        names = [meta.hidden_states_argument_name]
        if meta.return_encoder_hidden_states_index is not None:
            names.append(meta.encoder_hidden_states_argument_name)
        if any(n not in takes for n in names):
            raise RecacheError(f"transformer {name} is not supported: diffusers registers {cls.__name__} with the "
                               f"argument(s) {', '.join(names)}, which its forward does not take")
    if len({meta.return_encoder_hidden_states_index is None for meta in metas.values()}) > 1:
        raise RecacheError(f"transformer {name} is not supported: some of its blocks carry the text stream apart "
                           "and others joined to the image stream, so they do not form one residual stack")


def check_blocks_not_compiled(name: str, blocks: list[torch.nn.Module]) -> None:
    """Blocks compiled one by one (``compile_repeated_blocks``) would trace recache's block hooks into each block's
    graph: one recompile per block class, compute/cache decision and CFG branch, past dynamo's limit (a hard
    error with ``fullgraph=True``, silently eager without). Refused, with what to do instead."""
    if any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks):
        raise RecacheError(f"the blocks of {name} are compiled one by one (regional compile, "
                           "compile_repeated_blocks), which cannot run recache's block hooks; compile the whole "
                           "transformer instead (torch.compile(pipe.transformer) or pipe.transformer.compile())")


def model_fingerprint(transformer: torch.nn.Module) -> str:
    """``<class>:<hash of its architecture config>``: what a schedule or policy trained on this model records, so
    one made for another architecture is refused. Weights are not hashed (two fine-tunes share a fingerprint)."""
    transformer = unwrap(transformer)
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{type(transformer).__name__}:{digest}"
