"""recache: budgeted caching schedules for diffusion transformers.

``recache.enable(pipe, budget=...)``, ``recache.summary(pipe)`` and ``recache.disable(pipe)`` cache a diffusers
pipeline (imported on first use, so ``import recache`` stays light)."""

from recache._version import __version__

_FACADE = ("enable", "disable", "refresh", "summary")


def __getattr__(name: str):
    if name in _FACADE:
        from recache import api

        return getattr(api, name)
    raise AttributeError(f"module 'recache' has no attribute {name!r}")


__all__ = ["__version__", *_FACADE]
