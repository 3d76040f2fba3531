"""ImageNet-style class folders of JPEGs (root/train/<class>/*, root/val/<class>/*), decoded by workers.

Too large for memory, so unlike the small sets it goes through torchvision's ImageFolder and worker processes.
"""

from __future__ import annotations

import copy
import functools
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets, transforms

from cap.data.bundle import CycleBatches, DataBundle, DataError, derive_seed, shard_indices, subset_indices
from cap.data.config import DataConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize to 256/224 of the crop, then centre-crop: the standard ImageNet evaluation view."""
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def train_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"imagenet: folder {folder} does not exist; expected class folders "
                        f"{folder}/<class>/*.JPEG")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"imagenet: {folder} holds no class folders; expected {folder}/<class>/*.JPEG "
                        "(the validation set must be sorted into class folders too)")
    return classes


def _image_folder(folder: Path, transform: transforms.Compose) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as exc:  # raised for a class folder without a single image
        raise DataError(f"imagenet: {folder}: {exc}") from exc


def _pick(dataset: datasets.ImageFolder, idx: torch.Tensor | None) -> Dataset:
    return dataset if idx is None else Subset(dataset, idx.tolist())


class ShardSampler(Sampler[int]):
    """DistributedSampler's job with resumable positions: a (seed, epoch)-seeded order shared by all ranks,
    this rank's shard of it (cap.data.bundle.shard_indices), minus `skip` leading samples."""

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int, world_size: int, even: bool) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch, self.skip = 0, 0

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "epoch", self.epoch)))
        else:
            order = torch.arange(self.size)
        return shard_indices(order, self.rank, self.world_size, self.even)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:].tolist())

    def __len__(self) -> int:
        return len(self._indices()) - self.skip


class ShardedLoader:
    """A DataLoader over a ShardSampler with the TensorLoader's resumable interface (`epoch`, `start_batch`)."""

    def __init__(self, loader: DataLoader, sampler: ShardSampler) -> None:
        self.loader, self.sampler = loader, sampler
        self.dataset = loader.dataset
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return -(-len(self.sampler._indices()) // self.loader.batch_size)  # a whole pass, whatever is skipped

    def __iter__(self) -> Iterator:
        self.sampler.epoch, self.sampler.skip = self.epoch, self.start_batch * self.loader.batch_size
        self.epoch, self.start_batch = self.epoch + 1, 0
        return iter(self.loader)


def _leave_ctrl_c_to_the_trainer(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the loader's workers too; the trainer stops at the next step and checkpoints,
    which needs the workers alive (one that died of the KeyboardInterrupt would end the run with an error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_imagenet(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Training, validation and calibration loaders over root/train and root/val, training and validation
    sharded over the ranks (validation without repeats: every image counts once).

    Shuffling comes from (seed, epoch); the workers' augmentation seeds from a generator seeded by `seed`
    (with workers=0 the augmentation draws from torch's global generator instead)."""
    if cfg.root is None:
        raise DataError("data.name=imagenet needs data.root: a folder with train/<class>/* and val/<class>/*")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"imagenet: folder {root} does not exist; expected {root}/train/<class>/* and "
                        f"{root}/val/<class>/*")
    train_classes, val_classes = _classes(root / "train"), _classes(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"imagenet: train and val class folders differ: only in train {only_train[:5]}"
                        f"{' ...' if len(only_train) > 5 else ''}, only in val {only_val[:5]}"
                        f"{' ...' if len(only_val) > 5 else ''}")
    size = cfg.image_size
    train_set = _image_folder(root / "train", train_transform(size) if cfg.augment else eval_transform(size))
    val_set = _image_folder(root / "val", eval_transform(size))
    calib_set = copy.copy(train_set)  # same file list, no second directory scan; only the transform differs
    calib_set.transform = eval_transform(size)

    train_idx = subset_indices(len(train_set), cfg.train_subset, seed, "train")
    test_set = _pick(val_set, subset_indices(len(val_set), cfg.test_subset, seed, "test"))
    loader = functools.partial(DataLoader, num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                               persistent_workers=cfg.workers > 0, worker_init_fn=_leave_ctrl_c_to_the_trainer)
    train_part = _pick(train_set, train_idx)
    shards = functools.partial(ShardSampler, rank=rank, world_size=world_size)
    train_sampler = shards(len(train_part), shuffle=True, seed=derive_seed(seed, "train"), even=True)
    train = ShardedLoader(loader(train_part, batch_size=cfg.batch_size, sampler=train_sampler,
                                 generator=torch.Generator().manual_seed(derive_seed(seed, "train", rank))),
                          train_sampler)
    test_sampler = shards(len(test_set), shuffle=False, seed=0, even=False)
    test = ShardedLoader(loader(test_set, batch_size=cfg.eval_batch_size, sampler=test_sampler), test_sampler)
    calib = loader(_pick(calib_set, train_idx), batch_size=cfg.batch_size, shuffle=True,
                   generator=torch.Generator().manual_seed(derive_seed(seed, "calib")))
    return DataBundle(train=train, test=test, calib=CycleBatches(calib), in_channels=3,
                      num_classes=len(train_classes), input_size=size, train_size=len(train_part),
                      test_size=len(test_set), name="imagenet")
