"""Batches built on the training device from a whole split kept there as uint8.

The split lives on the device once (50,000 CIFAR images are 150 MB); every batch is cut from
it with tensor operations: a seeded shuffle, then one gather that does the random crop (with
zero padding) and the horizontal flip together, then normalization. No worker processes and no
per-image Python, and the same code on CUDA and on the CPU.

Randomness comes from a generator seeded with (seed, epoch), so any epoch's batches can be
rebuilt exactly, which is what lets an interrupted training resume bit for bit.

In distributed training every process holds the whole split and draws the same shuffle and the
same crops and flips for each global batch of `batch_size` images, then keeps its own slice of
it (rank r of w: the r-th of w near-equal parts). The processes together thus train on exactly
the batches one process would, and each epoch's shards are disjoint and reshuffled.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cifar_pipeline.model import input_normalization

SIZE = 32


class DeviceLoader:
    """Iterate (images, labels) batches: images float32 NCHW, normalized, channels_last
    (unless `channels_last=False`); labels int64. `augment` turns on shuffling, crop and flip.
    With `world_size` > 1, each batch is process `rank`'s slice of a global batch of `batch_size`."""

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
        rank: int = 0,
        world_size: int = 1,
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
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.scale, self.shift = (t.to(self.device) for t in input_normalization(mean, std))

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
            own = rank_slice(len(index), self.rank, self.world_size)
            images = self.images[index[own]]
            if self.augment:  # drawn for the whole global batch, so that they do not depend on the process count
                crops = random_crops(len(index), self.padding, self.flip, generator)
                images = apply_crops(images, self.padding, crops[own])
            yield self.normalize(images), self.labels[index[own]]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW. The permuted view of an NHWC tensor already has the
        channels_last memory layout, so channels_last costs no copy."""
        x = images.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return x if self.channels_last else x.contiguous()


def rank_slice(size: int, rank: int, world_size: int) -> slice:
    """Process `rank`'s part of `size` items split into `world_size` near-equal, consecutive parts."""
    return slice(size * rank // world_size, size * (rank + 1) // world_size)


def crop_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """A random SIZE x SIZE crop of each zero-padded image, mirrored left-right with probability
    1/2: the seed's RandomCrop(32, padding) + RandomHorizontalFlip, as a single gather."""
    return apply_crops(images, padding, random_crops(len(images), padding, flip, generator))


def random_crops(batch: int, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """[batch, 3]: each image's crop offsets (dy, dx), uniform in [0, 2*padding], and whether it
    is mirrored (1 with probability 1/2 when `flip`, else 0)."""
    device = generator.device
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    if flip:
        mirrored = torch.rand((batch, 1), device=device, generator=generator) < 0.5
    else:
        mirrored = torch.zeros((batch, 1), dtype=torch.bool, device=device)
    return torch.cat([dy, dx, mirrored.long()], dim=1)


def apply_crops(images: torch.Tensor, padding: int, crops: torch.Tensor) -> torch.Tensor:
    """images: uint8 [B, H, W, C], cropped (from the zero-padded image) and mirrored as `crops`
    (from random_crops) says, as one gather; a mirrored image reads its columns right to left."""
    device = images.device
    padded = F.pad(images, (0, 0, padding, padding, padding, padding)) if padding else images
    dy, dx, mirrored = crops[:, 0:1], crops[:, 1:2], crops[:, 2:3].bool()
    steps = torch.arange(SIZE, device=device)
    rows = dy + steps  # [B, SIZE]
    cols = torch.where(mirrored, dx + SIZE - 1 - steps, dx + steps)
    batch_index = torch.arange(len(images), device=device)[:, None, None]
    return padded[batch_index, rows[:, :, None], cols[:, None, :]]  # [B, SIZE, SIZE, C]
