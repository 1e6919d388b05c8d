"""Scores from the embedded digit classifier: feature distance to the reference, class accuracy, log-probability."""

from __future__ import annotations

import torch

from recache.models.classifier import DigitClassifier


@torch.no_grad()
def classifier_scores(classifier: DigitClassifier, x: torch.Tensor, classes: torch.Tensor,
                      ref_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample ``feature_distance`` (Euclidean, penultimate features, if ``ref_features`` given),
    ``class_correct`` (argmax equals the intended class) and ``class_logprob`` (log p(intended class))."""
    features = classifier.features(x)
    logp = classifier.head(features).log_softmax(-1)
    scores = {"class_correct": (logp.argmax(-1) == classes).float(),
              "class_logprob": logp.gather(1, classes[:, None])[:, 0]}
    if ref_features is not None:
        scores["feature_distance"] = (features - ref_features).norm(dim=1)
    return scores
