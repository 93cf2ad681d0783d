"""The device loader: seeded shuffling, crop with zero padding, flip, normalization, layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar_pipeline.loader import DeviceLoader, crop_and_flip

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def coordinate_images(n: int) -> np.ndarray:
    """Pixel (r, c) holds (r + 1, c + 1, 255): zero only where a crop reads padding."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows + 1, cols + 1, np.full_like(rows, 255)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], n, axis=0)


def reference_crop(image: np.ndarray, padding: int, dy: int, dx: int, flipped: bool) -> np.ndarray:
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[dy:dy + 32, dx:dx + 32]
    return crop[:, ::-1] if flipped else crop


def test_crop_is_a_window_of_the_zero_padded_image():
    padding = 4
    images = coordinate_images(2000)
    out = crop_and_flip(torch.from_numpy(images), padding, True, torch.Generator().manual_seed(0)).numpy()
    offsets, flips = set(), []
    for image, crop in zip(images, out):
        # Pixel (16, 16) always lies inside the image: it tells the offsets and the direction.
        dy = int(crop[16, 16, 0]) - 1 - 16 + padding
        flipped = crop[16, 17, 1] < crop[16, 16, 1]
        dx = int(crop[16, 16, 1]) - 1 + padding - (32 - 1 - 16 if flipped else 16)
        assert 0 <= dy <= 2 * padding and 0 <= dx <= 2 * padding
        np.testing.assert_array_equal(crop, reference_crop(image, padding, dy, dx, flipped))
        offsets.add((dy, dx))
        flips.append(flipped)
    assert len(offsets) == (2 * padding + 1) ** 2  # every offset occurs
    assert 0.4 < np.mean(flips) < 0.6


def test_a_flip_is_a_mirror():
    images = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    out = crop_and_flip(torch.from_numpy(images), 0, True, torch.Generator().manual_seed(1)).numpy()
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    unchanged = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert np.all(mirrored ^ unchanged)
    assert 0 < mirrored.sum() < len(images)


def test_evaluation_batches_are_normalized_in_order_and_channels_last():
    images = np.random.default_rng(0).integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(25) % 10
    loader = DeviceLoader(images, labels, 10, device="cpu", mean=MEAN, std=STD)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and len(batches[-1][1]) == 5  # the last batch is kept
    x = torch.cat([b[0] for b in batches])
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(labels))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    plain = DeviceLoader(images, labels, 10, device="cpu", mean=MEAN, std=STD, channels_last=False)
    assert next(iter(plain))[0].is_contiguous()


def training_order(loader: DeviceLoader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def test_shuffle_is_seeded_per_epoch_and_a_permutation():
    images = np.zeros((100, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(100)

    def loader(seed):
        return DeviceLoader(images, labels, 32, device="cpu", mean=MEAN, std=STD, augment=True, seed=seed)

    a, b = loader(0), loader(0)
    assert torch.equal(training_order(a, 1), training_order(b, 1))  # rebuilt exactly, e.g. on resume
    assert not torch.equal(training_order(a, 1), training_order(a, 2))
    assert not torch.equal(training_order(a, 1), training_order(loader(1), 1))
    assert sorted(training_order(a, 3).tolist()) == list(range(100))


def test_rejects_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match="uint8 images"):
        DeviceLoader(np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2), 2, device="cpu", mean=MEAN, std=STD)
