"""Data that ships inside installed packages (no downloads)."""

from recache.data.mnist import IMAGE_SIZE, load_mnist

__all__ = ["IMAGE_SIZE", "load_mnist"]
