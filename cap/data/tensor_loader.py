"""Batching of datasets that fit in memory (MNIST-like, CIFAR), in the training process itself.

Indexing a uint8 tensor and augmenting a whole batch at once costs well under a millisecond per batch,
far less than shipping batches from DataLoader worker processes would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from cap.data.bundle import (
    Batch,
    CycleBatches,
    DataBundle,
    DataError,
    InMemoryData,
    derive_seed,
    shard_indices,
    subset_indices,
)
from cap.data.config import DataConfig

PAD = 4
"""zero padding of the random crop (the CIFAR ResNet recipe)"""


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units, exactly (via a histogram)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])]).to(torch.float64)
    count = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / count
    var = (hist * values**2).sum(dim=1) / count - mean**2
    # A constant channel would divide by zero; one grey level keeps its normalised values finite.
    std = var.clamp_min(0).sqrt().clamp_min(1.0 / 255.0)
    return mean.to(torch.float32), std.to(torch.float32)


def crop_flip_draws(n: int, gen: torch.Generator, pad: int = PAD) -> tuple[Tensor, Tensor, Tensor]:
    """The random numbers of one batch's augmentation: row and column offsets, flips."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return dy, dx, flip


def random_crop_flip(images: Tensor, gen: torch.Generator, pad: int = PAD) -> Tensor:
    """Random crop after `pad` pixels of zero padding plus a random horizontal flip, per image, in one gather.

    Each output pixel's source index in the padded image is computed for the whole batch, so the cost is one
    pad and one torch.gather instead of a Python loop over images."""
    n, c, h, w = images.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = F.pad(images, (pad, pad, pad, pad)).reshape(n, c, hp * wp)
    dy, dx, flip = crop_flip_draws(n, gen, pad)
    col = torch.arange(w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - col, col)
    rows = dy[:, None] + torch.arange(h)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(padded, 2, index).reshape(n, c, h, w)


class TensorLoader:
    """Batches (normalised float32 images, int64 labels) from uint8 images [N, C, H, W] held in memory.

    With `shuffle`, each pass draws a new order (and augmentation) from a generator seeded by
    (seed, epoch): epochs differ, runs with the same seed repeat exactly. `epoch` is the pass the next
    iteration makes (it counts up by itself and may be set to resume a run); `start_batch` skips that
    many batches of the next pass (resuming mid-epoch), drawing their augmentation so that the batches
    after them are exactly those of an uninterrupted pass.

    Data parallelism: with `world_size` > 1 the loader yields rank `rank`'s shard (see shard_indices);
    all ranks draw the same order, each its own augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean: Tensor, std: Tensor, *,
                 shuffle: bool = False, augment: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, even_shards: bool | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"TensorLoader needs uint8 images [N, C, H, W], got {images.dtype} "
                            f"{list(images.shape)}")
        if labels.shape != (images.shape[0],) or images.shape[0] == 0:
            raise DataError(f"TensorLoader needs one label per image and at least one image, got "
                            f"{images.shape[0]} images and labels of shape {list(labels.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.even_shards = shuffle if even_shards is None else even_shards
        self.epoch = 0
        self.start_batch = 0
        self.mean, self.std = mean, std
        # (x / 255 - mean) / std as one multiply-add on the float copy
        self._scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
        self._shift = (-mean / std).reshape(1, -1, 1, 1)

    @property
    def shard_size(self) -> int:
        n = self.labels.shape[0]
        if self.even_shards:
            return -(-n // self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        if self.world_size > 1:
            order = shard_indices(order if order is not None else torch.arange(n), self.rank, self.world_size,
                                  self.even_shards)
            # same order on every rank, but each rank its own augmentation stream
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch, "rank", self.rank))
        self.epoch += 1
        skip, self.start_batch = self.start_batch, 0
        return self._batches(order, gen, skip)

    def _batches(self, order: Tensor | None, gen: torch.Generator, skip: int) -> Iterator[Batch]:
        total = self.labels.shape[0] if order is None else len(order)
        for number, start in enumerate(range(0, total, self.batch_size)):
            if number < skip:
                if self.augment:
                    crop_flip_draws(min(self.batch_size, total - start), gen)
                continue
            if order is None:
                x = self.images[start:start + self.batch_size]
                y = self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = random_crop_flip(x, gen)
            yield x.to(torch.float32).mul_(self._scale).add_(self._shift), y


def take_subsets(data: InMemoryData, cfg: DataConfig, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images, labels), (test images, labels)) after the configured seeded subsets."""
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    if (idx := subset_indices(train_x.shape[0], cfg.train_subset, seed, "train")) is not None:
        train_x, train_y = train_x[idx], train_y[idx]
    if (idx := subset_indices(test_x.shape[0], cfg.test_subset, seed, "test")) is not None:
        test_x, test_y = test_x[idx], test_y[idx]
    return (train_x, train_y), (test_x, test_y)


def in_memory_bundle(name: str, data: InMemoryData, cfg: DataConfig, seed: int, rank: int = 0,
                     world_size: int = 1) -> DataBundle:
    """Subset, normalise and batch an in-memory dataset; training and test sets sharded over the ranks.

    Mean and std come from the whole training set, so they do not move with the subset drawn. The
    calibration batches are not sharded: every rank re-estimates BatchNorm on the same batches and
    so ends with the same statistics."""
    mean, std = channel_stats(data.train_images)
    (train_x, train_y), (test_x, test_y) = take_subsets(data, cfg, seed)
    train = TensorLoader(train_x, train_y, cfg.batch_size, mean, std, shuffle=True, augment=cfg.augment,
                         seed=derive_seed(seed, "train"), rank=rank, world_size=world_size)
    test = TensorLoader(test_x, test_y, cfg.eval_batch_size, mean, std, rank=rank, world_size=world_size)
    calib = TensorLoader(train_x, train_y, cfg.batch_size, mean, std, shuffle=True,
                         seed=derive_seed(seed, "calib"))
    return DataBundle(train=train, test=test, calib=CycleBatches(calib),
                      in_channels=train_x.shape[1], num_classes=data.num_classes,
                      input_size=train_x.shape[-1], train_size=train_x.shape[0], test_size=test_x.shape[0],
                      name=name)
