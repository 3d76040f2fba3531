"""Which data a run reads and how it is batched (`data.*` in a run's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    name: Literal["fashion-mnist", "mnist", "kmnist", "idx", "cifar10", "cifar100", "imagenet"] = (
        "fashion-mnist"
    )
    root: str | None = None
    """folder of the dataset; Fashion-MNIST is found at Debian's location without one"""
    train_subset: int | None = None
    """use only this many training images (a fixed, seeded, class-mixed subset)"""
    test_subset: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True
    """random crop (padding 4, or random-resized for ImageNet) and horizontal flip"""
    image_size: int = 224
    """ImageNet only: training crop size (evaluation resizes to 256/224 of it, then centre-crops)"""
    workers: int = 2
    """DataLoader worker processes (ImageNet folders; in-memory sets are batched in-process), or with
    data.loader=dali the DALI CPU threads per process"""
    loader: Literal["torch", "dali"] = "torch"
    """torch: cap's in-process loader / torchvision DataLoader; dali: the dali_pipelines/ pipelines (GPU
    decoding on a GPU, DALI's CPU mode without one)"""
