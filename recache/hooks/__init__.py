"""recache on diffusers transformers: ``apply_recache(transformer, RecacheHookConfig(...))``, diffusers-style."""

from recache.hooks.clock import pipeline_clock
from recache.hooks.schedule_cache import HOOK_MECHANISMS, RecacheHookConfig, RecacheStats, apply_recache, remove_recache
from recache.hooks.transformers import model_fingerprint, transformer_blocks

__all__ = ["HOOK_MECHANISMS", "RecacheHookConfig", "RecacheStats", "apply_recache", "model_fingerprint",
           "pipeline_clock", "remove_recache", "transformer_blocks"]
