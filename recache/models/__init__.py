"""Models: the embedded DiT (with its size registry), the digit classifier, and their safetensors loaders."""

from recache.models.classifier import ClassifierConfig, DigitClassifier
from recache.models.dit import DIT_CONFIGS, DiT, DiTConfig
from recache.models.pretrained import EMBEDDED_MODELS, load_classifier, load_dit, load_pretrained, save_pretrained

__all__ = ["ClassifierConfig", "DIT_CONFIGS", "DiT", "DiTConfig", "DigitClassifier", "EMBEDDED_MODELS",
           "load_classifier", "load_dit", "load_pretrained", "save_pretrained"]
