"""`data.loader=dali`: the dali_pipelines/ pipelines behind the same interface as the torch loaders.

Each loader yields (images float32 [N, C, H, W] normalised, labels int64 [N]) and has `epoch`,
`start_batch` and `len()` like cap's TensorLoader, so the trainer, DDP and resume work unchanged.
Without a GPU the pipelines run in DALI's CPU mode (device_id=None); with `device_id` they decode on
"mixed" and the batches arrive on that GPU.

Resume: in-memory arrays resume at the exact sample where they stopped (the order comes from cap's own
sharded source), but the augmentation draws of the resumed pass start afresh (DALI's random state is not
saved); folder readers restart their pass and skip `start_batch` batches, and their shuffle state is
DALI's own, so the order after a resume differs from an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cap.data.bundle import Batch, CycleBatches, DataBundle, DataError, InMemoryData, derive_seed
from cap.data.config import DataConfig

DALI_HINT = ("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120==2.4.0 (it runs on the CPU "
             "without a GPU too), or use data.loader=torch")


def _require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{DALI_HINT} ({exc})") from exc


def _seed31(*keys: object) -> int:
    return derive_seed(*keys) % (2**31 - 1)


def _batches(iterator, where: str) -> Iterator[Batch]:
    """(images, labels) from a DALIGenericIterator; a decoding failure becomes a DataError naming the data."""
    try:
        for out in iterator:
            yield out[0]["images"], out[0]["labels"].reshape(-1).long()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise DataError(f"DALI could not read {where}: {first}") from exc


class DaliArrayLoader:
    """In-memory images through dali_pipelines.array_pipeline; one small pipeline per pass."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: list[float],
                 std: list[float], *, shuffle: bool, augment: bool, seed: int, rank: int = 0, world_size: int = 1,
                 threads: int = 2, device_id: int | None = None) -> None:
        from dali_pipelines import ArraySource

        self.source = ArraySource(images, labels, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                  world_size=world_size)
        self.mean, self.std, self.augment = mean, std, augment
        self.seed, self.rank, self.threads, self.device_id = seed, rank, threads, device_id

    epoch = property(lambda self: self.source.epoch, lambda self, v: setattr(self.source, "epoch", v))
    start_batch = property(lambda self: self.source.start_batch,
                           lambda self, v: setattr(self.source, "start_batch", v))

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from dali_pipelines import array_pipeline

        pipe = array_pipeline(self.source, self.mean, self.std, self.augment, on_gpu=self.device_id is not None,
                              batch_size=self.source.batch_size, num_threads=self.threads, device_id=self.device_id,
                              seed=_seed31(self.seed, "augment", self.source.epoch, self.rank))
        pipe.build()  # calls iter(source): this pass's order, from the source's epoch and start batch
        return _batches(DALIGenericIterator([pipe], ["images", "labels"], prepare_first_batch=False),
                        "the in-memory images")


class DaliFolderLoader:
    """A built folder pipeline and its iterator, reset after every full pass."""

    def __init__(self, pipe, *, last_batch: str, where: str) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from dali_pipelines.imagenet import READER

        pipe.build()
        self.iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER, auto_reset=True,
                                            last_batch_policy=getattr(LastBatchPolicy, last_batch),
                                            prepare_first_batch=False)
        self.where, self.epoch, self.start_batch = where, 0, 0
        self._unfinished: Iterator[Batch] | None = None

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self) -> Iterator[Batch]:
        # DALI cannot reset mid-pass: a pass left early (max_steps_per_epoch, BN calibration) is read to
        # its end first, so that every pass starts at the beginning of an epoch
        if self._unfinished is not None:
            for _ in self._unfinished:
                pass
        skip, self.start_batch = self.start_batch, 0
        self.epoch += 1
        self._unfinished = self._pass(skip)
        return self._unfinished

    def _pass(self, skip: int) -> Iterator[Batch]:
        for number, batch in enumerate(_batches(self.iterator, self.where)):
            if number >= skip:
                yield batch
        self._unfinished = None


def _nhwc(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


def dali_array_bundle(name: str, data: InMemoryData, cfg: DataConfig, seed: int, rank: int = 0,
                      world_size: int = 1, device_id: int | None = None) -> DataBundle:
    """The in-memory sets (Fashion-MNIST, IDX, CIFAR) through DALI, subsetted and normalised as the torch path."""
    from cap.data.tensor_loader import channel_stats, take_subsets

    _require_dali()
    mean, std = (t.tolist() for t in channel_stats(data.train_images))
    (train_x, train_y), (test_x, test_y) = take_subsets(data, cfg, seed)
    common = {"mean": mean, "std": std, "threads": cfg.workers or 1, "device_id": device_id}
    train = DaliArrayLoader(_nhwc(train_x), train_y.numpy(), cfg.batch_size, shuffle=True, augment=cfg.augment,
                            seed=derive_seed(seed, "train"), rank=rank, world_size=world_size, **common)
    test = DaliArrayLoader(_nhwc(test_x), test_y.numpy(), cfg.eval_batch_size, shuffle=False, augment=False,
                           seed=0, rank=rank, world_size=world_size, **common)
    calib = DaliArrayLoader(_nhwc(train_x), train_y.numpy(), cfg.batch_size, shuffle=True, augment=False,
                            seed=derive_seed(seed, "calib"), **common)
    return DataBundle(train=train, test=test, calib=CycleBatches(calib), in_channels=train_x.shape[1],
                      num_classes=data.num_classes, input_size=train_x.shape[-1], train_size=train_x.shape[0],
                      test_size=test_x.shape[0], name=name)


def dali_imagenet_bundle(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                         device_id: int | None = None) -> DataBundle:
    """ImageNet class folders through the DALI pipelines; shard_id = global rank, num_shards = world size."""
    from pathlib import Path

    _require_dali()
    from dali_pipelines import FolderError, imagenet_train_pipeline, imagenet_val_pipeline, scan_image_folder
    from dali_pipelines.imagenet import decoder_device

    if cfg.root is None:
        raise DataError("data.name=imagenet needs data.root: a folder with train/<class>/* and val/<class>/*")
    if cfg.train_subset is not None or cfg.test_subset is not None:
        raise DataError("data.loader=dali reads whole folders: data.train_subset/test_subset need data.loader=torch")
    root = Path(cfg.root)
    try:
        train_classes, train_size = scan_image_folder(root / "train")
        val_classes, val_size = scan_image_folder(root / "val")
    except FolderError as exc:
        raise DataError(f"imagenet: {exc}") from exc
    if train_classes != val_classes:
        raise DataError(f"imagenet: train and val class folders differ ({len(train_classes)} against "
                        f"{len(val_classes)} classes, first difference: "
                        f"{sorted(set(train_classes) ^ set(val_classes))[:3]})")
    threads, size, decoder = cfg.workers or 1, cfg.image_size, decoder_device(device_id)
    common = {"num_threads": threads, "device_id": device_id, "crop": size, "decoder_device": decoder}
    train = DaliFolderLoader(imagenet_train_pipeline(
        str(root / "train"), shard_id=rank, num_shards=world_size, reader_seed=_seed31(seed, "train"),
        batch_size=cfg.batch_size, seed=_seed31(seed, "augment", rank), **common),
        last_batch="DROP", where=str(root / "train"))
    test = DaliFolderLoader(imagenet_val_pipeline(
        str(root / "val"), shard_id=rank, num_shards=world_size, batch_size=cfg.eval_batch_size, **common),
        last_batch="PARTIAL", where=str(root / "val"))
    # every rank re-estimates BatchNorm on the same un-augmented batches: one unsharded pass order
    calib = DaliFolderLoader(imagenet_val_pipeline(
        str(root / "train"), shard_id=0, num_shards=1, shuffle=True, reader_seed=_seed31(seed, "calib"),
        batch_size=cfg.batch_size, **common),
        last_batch="PARTIAL", where=str(root / "train"))
    return DataBundle(train=train, test=test, calib=CycleBatches(calib), in_channels=3,
                      num_classes=len(train_classes), input_size=size, train_size=train_size, test_size=val_size,
                      name="imagenet")
