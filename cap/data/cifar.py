"""CIFAR-10 and CIFAR-100 from the "python version" pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cap.data.bundle import DataError, InMemoryData


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    """the folder the archive unpacks to"""
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), b"labels", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


# What a CIFAR batch's pickle may name: numpy's array reconstruction (under numpy 1's and 2's module names) and
# the bytes decoder of protocol-2 pickles written by Python 3. Anything else (os.system, builtins.eval, ...)
# would be called by the unpickler: such a file is refused before it can run anything.
_ALLOWED_GLOBALS = {
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a callable a CIFAR batch does not need."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images [N, 3, 32, 32] and int64 labels [N], with its format checked."""
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused to load: the pickle calls {exc}, which no CIFAR batch needs (only numpy "
                        "arrays, lists and bytes); replace the file with the original from the CIFAR archive") from exc
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise DataError(f"{path}: not a readable CIFAR pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and {layout.label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' should be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(f"{path}: labels outside 0..{layout.num_classes - 1}")
    # each row holds the red, then green, then blue 32x32 plane, row-major
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: str | Path | None) -> InMemoryData:
    """Read CIFAR-10 or CIFAR-100 from `root`: the unpacked folder itself, or the folder that contains it."""
    layout = LAYOUTS[name]
    names = ", ".join(layout.train + layout.test)
    if root is None:
        raise DataError(f"data.name={name} needs data.root: the folder {layout.folder} (python version) "
                        f"holding {names}")
    folder = Path(root)
    if (folder / layout.folder).is_dir():
        folder = folder / layout.folder
    if not folder.is_dir():
        raise DataError(f"{name}: folder {folder} does not exist; expected {layout.folder} holding {names}")
    missing = [f for f in layout.train + layout.test if not (folder / f).is_file()]
    if len(missing) == len(layout.train + layout.test):  # each name once (an empty folder lacks them all)
        raise DataError(f"{name}: {folder} holds none of {names} (nor a subfolder {layout.folder} holding them)")
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)}; expected {names} "
                        f"(or a subfolder {layout.folder} holding them)")
    splits = []
    for files in (layout.train, layout.test):
        parts = [_read_batch(folder / f, layout) for f in files]
        images = np.concatenate([p[0] for p in parts])
        if images.shape[0] == 0:
            raise DataError(f"{name}: {', '.join(files)} in {folder} hold no images")
        splits.append((torch.from_numpy(images), torch.from_numpy(np.concatenate([p[1] for p in parts]))))
    (train_x, train_y), (test_x, test_y) = splits
    return InMemoryData(train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
                        num_classes=layout.num_classes)
