"""Datasets as ready-to-train batches: `build_data(cfg.data, cfg.seed)` is the one entry point."""

from __future__ import annotations

from cap.config import DataConfig
from cap.data.bundle import Batch, Batches, DataBundle, DataError
from cap.data.cifar import load_cifar
from cap.data.idx import load_idx
from cap.data.imagenet import build_imagenet
from cap.data.tensor_loader import TensorLoader, in_memory_bundle

__all__ = ["Batch", "Batches", "DataBundle", "DataError", "TensorLoader", "build_data"]


def build_data(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Load `cfg.name`, draw the seeded subsets and wrap the splits in loaders.

    Small sets are held in memory and batched in-process; ImageNet folders stream through DataLoader
    workers. With world_size > 1, training and test batches are rank `rank`'s shard."""
    if cfg.name == "imagenet":
        return build_imagenet(cfg, seed, rank, world_size)
    if cfg.name in ("cifar10", "cifar100"):
        data = load_cifar(cfg.name, cfg.root)
    else:
        data = load_idx(cfg.name, cfg.root)
    return in_memory_bundle(cfg.name, data, cfg, seed, rank, world_size)
