"""Batches built on the training device from a whole split kept there as uint8.

The split lives on the device once (50,000 CIFAR images are 150 MB); every batch is cut from
it with tensor operations: a seeded shuffle, then one gather that does the random crop (with
zero padding) and the horizontal flip together, then normalization. No worker processes and no
per-image Python, and the same code on CUDA and on the CPU.

Randomness comes from a generator seeded with (seed, epoch), so any epoch's batches can be
rebuilt exactly, which is what lets an interrupted training resume bit for bit.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32


class DeviceLoader:
    """Iterate (images, labels) batches: images float32 NCHW, normalized, channels_last
    (unless `channels_last=False`); labels int64. `augment` turns on shuffling, crop and flip."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        channels_last: bool = True,
    ):
        self.device = torch.device(device)
        self.images = torch.as_tensor(images).to(self.device)  # uint8 [N, 32, 32, 3]
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"expected uint8 images [N, {SIZE}, {SIZE}, 3], got {self.images.dtype} {tuple(self.images.shape)}")
        self.batch_size = batch_size
        self.augment = augment
        self.padding = crop_padding if augment else 0
        self.flip = flip and augment
        self.seed = seed
        self.channels_last = channels_last
        self.epoch = 0
        # (x / 255 - mean) / std as one multiply-add
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=self.device) / std_t).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)  # the last, smaller batch included, as the seed's DataLoader

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle, crops and flips the next iteration produces."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        generator = torch.Generator(self.device).manual_seed(self.seed * 100_003 + self.epoch)
        if self.augment:
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.augment:
                images = crop_and_flip(images, self.padding, self.flip, generator)
            yield self.normalize(images), self.labels[index]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW. The permuted view of an NHWC tensor already has the
        channels_last memory layout, so channels_last costs no copy."""
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        return x if self.channels_last else x.contiguous()


def crop_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """A random SIZE x SIZE crop of each zero-padded image, mirrored left-right with probability
    1/2: the seed's RandomCrop(32, padding) + RandomHorizontalFlip, as a single gather.

    images: uint8 [B, H, W, C]. Each image's crop offsets (dy, dx) are uniform in [0, 2*padding];
    a flipped image reads its columns right to left."""
    batch = images.shape[0]
    device = images.device
    padded = F.pad(images, (0, 0, padding, padding, padding, padding)) if padding else images
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    steps = torch.arange(SIZE, device=device)
    rows = dy + steps  # [B, SIZE]
    cols = dx + steps
    if flip:
        mirrored = torch.rand((batch, 1), device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, dx + SIZE - 1 - steps, cols)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    return padded[batch_index, rows[:, :, None], cols[:, None, :]]  # [B, SIZE, SIZE, C]
