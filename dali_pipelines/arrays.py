"""A pipeline over images held in memory (CIFAR pickle batches, IDX files): the same augmentation as
cap's TensorLoader (zero padding of `pad` pixels, a random crop back to the original size at one of the
(2*pad+1)^2 offsets with equal probability, a random horizontal flip), then normalisation to float NCHW.

The samples come from an `ArraySource` through fn.external_source: it shards with the same rule as the
in-process loader (cap.data.bundle.shard_indices: a (seed, epoch)-seeded order shared by all ranks,
rank r taking every world_size-th sample; training shards padded to equal length, evaluation shards not),
keeps the last partial batch, and can start a pass at any batch (resume).
"""

from __future__ import annotations

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def

from cap.data.bundle import derive_seed, shard_indices


class ArraySource:
    """One rank's batches of (HWC uint8 images, int64 labels), one pass per `iter()`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1, even: bool | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"ArraySource needs uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.even = shuffle if even is None else even
        self.epoch, self.start_batch = 0, 0
        self._order: np.ndarray = np.arange(0)
        self._position = 0

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.labels)
        perm = (torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch)))
                if self.shuffle else torch.arange(n))
        return shard_indices(perm, self.rank, self.world_size, self.even).numpy()

    def __len__(self) -> int:
        return -(-len(self.order(0)) // self.batch_size)

    def __iter__(self) -> ArraySource:
        self._order = self.order(self.epoch)
        self._position = self.start_batch * self.batch_size
        self.epoch, self.start_batch = self.epoch + 1, 0
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._position >= len(self._order):
            raise StopIteration
        idx = self._order[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        return [self.images[i] for i in idx], [self.labels[i:i + 1] for i in idx]


@pipeline_def(enable_conditionals=False)
def array_pipeline(source: ArraySource, mean: list[float], std: list[float], augment: bool, pad: int = 4,
                   on_gpu: bool = False):
    images, labels = fn.external_source(source=source, num_outputs=2, dtype=[types.UINT8, types.INT64],
                                        layout=["HWC", ""])
    if on_gpu:
        images = images.gpu()
    mirror = 0
    if augment:
        height, width = source.images.shape[1:3]
        images = fn.crop(images, crop=(height + 2 * pad, width + 2 * pad), crop_pos_x=0.5, crop_pos_y=0.5,
                         out_of_bounds_policy="pad", fill_values=0)
        offsets = [i / (2 * pad) for i in range(2 * pad + 1)]  # the window's position, uniform over integers
        images = fn.crop(images, crop=(height, width), crop_pos_x=fn.random.uniform(values=offsets),
                         crop_pos_y=fn.random.uniform(values=offsets))
        mirror = fn.random.coin_flip(probability=0.5)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                      mean=[255 * m for m in mean], std=[255 * s for s in std])
    return images, labels
