"""What every dataset hands to training: batches, a calibration source and the shapes a model needs."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]
"""(images float32 [N, C, H, W], normalised; labels int64 [N])"""


class DataError(ValueError):
    """A dataset is missing, incomplete or corrupt; the message names the file or folder and what it wants."""


class Batches(Protocol):
    """An epoch's worth of batches that knows its length (a TensorLoader or a torch DataLoader)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    train: Batches
    """shuffled anew (and augmented, if configured) each time it is iterated; len = batches per epoch"""
    test: Batches
    """every test sample exactly once, in a fixed order, no augmentation, last partial batch kept"""
    calib: Callable[[int], Iterator[Batch]]
    """calib(n) yields n un-augmented training batches, for re-estimating BatchNorm statistics"""
    in_channels: int
    num_classes: int
    input_size: int
    """side of the square images the model sees"""
    train_size: int
    test_size: int
    name: str


@dataclass
class InMemoryData:
    """A whole dataset as uint8 images [N, C, S, S] and int64 labels [N], before subsetting and batching."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int


def derive_seed(seed: int, *keys: object) -> int:
    """An independent 63-bit seed per (seed, purpose, ...), so shuffling, subsets and calibration never share
    a random stream and any integer seed (negative too) works."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def subset_indices(total: int, size: int | None, seed: int, which: str) -> Tensor | None:
    """Sorted indices of a seeded random subset of `size` out of `total` (None: use everything).

    Random rather than the first `size`, because several datasets are stored sorted by class."""
    if size is None:
        return None
    if size > total:
        raise DataError(f"data.{which}_subset={size} asks for more than the {total} {which} images available")
    gen = torch.Generator().manual_seed(derive_seed(seed, which, "subset"))
    return torch.randperm(total, generator=gen)[:size].sort().values


def shard_indices(order: Tensor, rank: int, world_size: int, even: bool) -> Tensor:
    """This rank's share of `order`: every world_size-th index from `rank`.

    even=True (training) first repeats indices from the start until the length is a multiple of
    world_size, like torch's DistributedSampler, so every rank takes the same number of equally sized
    steps (DDP and the shared gate generator need that); at most world_size - 1 samples are seen twice
    per epoch. even=False (evaluation) splits without repeats, so each sample counts exactly once."""
    if world_size == 1:
        return order
    if even:
        total = -(-len(order) // world_size) * world_size
        reps = -(-total // len(order))
        order = order.repeat(reps)[:total]
    return order[rank::world_size]


class CycleBatches:
    """calib(n): n batches from `loader`, starting a new pass whenever one ends (BatchNorm calibration may ask
    for more batches than a small training set has). The loader's pass counter, if it has one, is part of
    a run's resumable state (see loader_positions)."""

    def __init__(self, loader: Iterable[Batch]) -> None:
        self.loader = loader

    def __call__(self, n_batches: int) -> Iterator[Batch]:
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.loader)), n_batches)


def loader_positions(bundle: DataBundle) -> dict[str, int | None]:
    """The pass counters of the training and calibration loaders (None where a loader keeps none)."""
    calib = getattr(bundle.calib, "loader", None)
    return {"train": getattr(bundle.train, "epoch", None), "calib": getattr(calib, "epoch", None)}


def restore_loader_positions(bundle: DataBundle, positions: dict[str, int | None]) -> None:
    for loader, value in ((bundle.train, positions.get("train")),
                          (getattr(bundle.calib, "loader", None), positions.get("calib"))):
        if value is not None and hasattr(loader, "epoch"):
            loader.epoch = value
