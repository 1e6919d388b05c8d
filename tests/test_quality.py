"""Quick checks that the shipped models are the trained ones (the full figures are in bench/)."""

import torch

from recache.data import load_mnist
from recache.models.pretrained import load_classifier
from recache.sampling.pipeline import DigitPipeline


def test_classifier_on_heldout_digits():
    images, labels = load_mnist("test")
    with torch.no_grad():
        acc = (load_classifier()(images[::4]).argmax(1) == labels[::4]).float().mean().item()
    assert acc >= 0.95


def test_guided_samples_show_their_class():
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=20)
    classes = torch.arange(10).repeat(3)
    samples = pipe(classes, list(range(500_000, 500_030)))
    with torch.no_grad():
        acc = (load_classifier()(samples).argmax(1) == classes).float().mean().item()
    assert acc >= 0.8
    assert samples.min() > -1.5 and samples.max() < 1.5


def test_sampling_is_deterministic_and_batch_independent():
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=8)
    a = pipe(torch.tensor([3, 5, 8]), [11, 12, 13])
    b = pipe(torch.tensor([3, 5, 8]), [11, 12, 13])
    c = pipe(torch.tensor([5]), [12])
    assert torch.equal(a, b)
    torch.testing.assert_close(a[1:2], c, atol=1e-5, rtol=1e-5)
