"""Quality of the embedded models: classifier accuracy on the held-out digits, and how often the classifier
assigns the intended class to guided DiT samples (50 per class, seeds never used in training).

    .venv/bin/python bench/embedded_quality.py [--per-class 50]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recache.data import load_mnist
from recache.io import write_json
from recache.models.pretrained import load_classifier
from recache.sampling.pipeline import DigitPipeline

SEED_OFFSET = 1_000_000  # sample seeds for this check; training never draws noise from explicit seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", default="runs/bench/embedded_quality.json")
    args = parser.parse_args()
    clf = load_classifier()
    images, labels = load_mnist("test")
    with torch.no_grad():
        real_acc = (clf(images).argmax(1) == labels).float().mean().item()
    pipe = DigitPipeline.from_pretrained("mnist-dit", guidance=args.guidance)
    classes = torch.arange(10).repeat_interleave(args.per_class)
    samples = torch.cat([pipe(classes[i:i + 100], [SEED_OFFSET + j for j in range(i, min(i + 100, len(classes)))])
                         for i in range(0, len(classes), 100)])
    with torch.no_grad():
        pred = clf(samples).argmax(1)
    per_class = [(pred[classes == c] == c).float().mean().item() for c in range(10)]
    sample_acc = (pred == classes).float().mean().item()
    result = {"classifier_heldout_accuracy": round(real_acc, 4), "heldout_digits": len(labels),
              "samples": len(classes), "guidance": pipe.guidance, "steps": pipe.steps,
              "sample_class_accuracy": round(sample_acc, 4), "per_class": [round(a, 3) for a in per_class]}
    write_json(Path(args.out), result)
    print("| check | value |")
    print("|---|---|")
    print(f"| classifier accuracy, {len(labels)} held-out real digits | {real_acc:.1%} |")
    print(f"| intended class of {len(classes)} guided samples (guidance {pipe.guidance:g}, {pipe.steps} steps) | "
          f"{sample_acc:.1%} |")
    print("| per class | " + " ".join(f"{c}:{a:.0%}" for c, a in enumerate(per_class)) + " |")


if __name__ == "__main__":
    main()
