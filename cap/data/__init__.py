"""Datasets as ready-to-train batches: `build_data(cfg.data, cfg.seed)` is the one entry point."""

from __future__ import annotations

from cap.data.bundle import Batch, Batches, DataBundle, DataError
from cap.data.cifar import load_cifar
from cap.data.config import DataConfig
from cap.data.idx import load_idx
from cap.data.tensor_loader import TensorLoader, in_memory_bundle

__all__ = ["Batch", "Batches", "DataBundle", "DataError", "TensorLoader", "build_data"]


def build_data(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
               device_id: int | None = None) -> DataBundle:
    """Load `cfg.name`, draw the seeded subsets and wrap the splits in loaders.

    Small sets are held in memory and batched in-process; ImageNet folders stream through DataLoader
    workers. With world_size > 1, training and test batches are rank `rank`'s shard. data.loader=dali
    puts the dali_pipelines/ pipelines behind the same interface (on GPU `device_id` with a GPU)."""
    if cfg.name == "imagenet":
        if cfg.loader == "dali":
            from cap.data.dali_loader import dali_imagenet_bundle

            return dali_imagenet_bundle(cfg, seed, rank, world_size, device_id)
        from cap.data.imagenet import build_imagenet  # torchvision: over a second to import, for ImageNet only

        return build_imagenet(cfg, seed, rank, world_size)
    if cfg.name in ("cifar10", "cifar100"):
        data = load_cifar(cfg.name, cfg.root)
    else:
        data = load_idx(cfg.name, cfg.root)
    if cfg.loader == "dali":
        from cap.data.dali_loader import dali_array_bundle

        return dali_array_bundle(cfg.name, data, cfg, seed, rank, world_size, device_id)
    return in_memory_bundle(cfg.name, data, cfg, seed, rank, world_size)
