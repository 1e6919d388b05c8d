"""recache: budgeted caching schedules for diffusion transformers."""

__version__ = "0.1.0"
