import torch

from recache.data import IMAGE_SIZE, load_mnist


def test_split_sizes_and_balance():
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (4000, 1, IMAGE_SIZE, IMAGE_SIZE) and test_x.shape == (1000, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.bincount(test_y).tolist() == [100] * 10
    assert train_x.min() >= -1 and train_x.max() <= 1


def test_splits_are_disjoint():
    train_x, _ = load_mnist("train", image_size=28)
    test_x, _ = load_mnist("test", image_size=28)
    train_keys = {bytes(x.numpy().tobytes()) for x in train_x}
    assert not any(bytes(x.numpy().tobytes()) in train_keys for x in test_x)
