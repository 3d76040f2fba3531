"""Data loading: real Fashion-MNIST where installed, otherwise small files generated in each real format."""

from __future__ import annotations

import gzip
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from cap.data import DataError, TensorLoader, build_data
from cap.data.cifar import load_cifar
from cap.data.idx import FASHION_ROOT, FILES, load_idx, parse_idx
from cap.data.imagenet import eval_transform
from cap.data.tensor_loader import channel_stats, random_crop_flip
from cap.engine.config import DataConfig

# ---------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """IDX writer: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the bytes; gzipped for a .gz path."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_idx(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, side: int = 28,
             sorted_labels: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    train_labels = rng.integers(0, 10, n_train)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_labels": np.sort(train_labels) if sorted_labels else train_labels,
        "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(root / (FILES[key] + (".gz" if gz else "")), array.astype(np.uint8))
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx(tmp_path, gz=gz)
    data = load_idx("idx", tmp_path)
    for split in ("train", "test"):
        images = getattr(data, f"{split}_images")
        assert images.dtype == torch.uint8 and images.shape == (len(arrays[f"{split}_images"]), 1, 32, 32)
        assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(arrays[f"{split}_images"]))
        border = images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.count_nonzero() == 0
        labels = getattr(data, f"{split}_labels")
        assert labels.dtype == torch.int64 and labels.tolist() == arrays[f"{split}_labels"].tolist()
    assert data.num_classes == max(arrays["train_labels"].max(), arrays["test_labels"].max()) + 1

    bundle = build_data(DataConfig(name="idx", root=str(tmp_path), batch_size=16, eval_batch_size=7), seed=0)
    assert (bundle.in_channels, bundle.input_size, bundle.train_size, bundle.test_size) == (1, 32, 60, 20)
    assert bundle.name == "idx" and len(bundle.train) == 4 and len(bundle.test) == 3
    x, y = next(iter(bundle.train))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64


def test_idx_header_errors(tmp_path: Path) -> None:
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    good = write_idx(tmp_path / "good", images).read_bytes()
    assert parse_idx(good, tmp_path / "good", 3).shape == (5, 28, 28)
    with pytest.raises(DataError, match=r"bad-magic-file.*magic number 0x00000801, expected 0x00000803"):
        parse_idx(write_idx(tmp_path / "x", images, magic=0x801).read_bytes(), Path("bad-magic-file"), 3)
    with pytest.raises(DataError, match=r"short-file: truncated: .*5x28x28 = 3920 bytes.*3910"):
        parse_idx(good[:-10], Path("short-file"), 3)
    with pytest.raises(DataError, match=r"short-header: truncated IDX header"):
        parse_idx(good[:9], Path("short-header"), 3)
    with pytest.raises(DataError, match=r"tiny: truncated IDX file"):
        parse_idx(good[:3], Path("tiny"), 3)
    with pytest.raises(DataError, match=r"long-file: 2 bytes after"):
        parse_idx(good + b"\0\0", Path("long-file"), 3)


def test_idx_file_errors(tmp_path: Path) -> None:
    make_idx(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(59, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz holds 60 images but .*"
                                        r"train-labels-idx1-ubyte.gz holds 59 labels"):
        load_idx("idx", tmp_path)

    write_idx(labels, np.zeros(60, dtype=np.uint8), magic=0x803)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: bad IDX magic"):
        load_idx("idx", tmp_path)

    labels.write_bytes(gzip.compress(struct.pack(">II", 0x801, 60) + bytes(50)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: truncated"):
        load_idx("idx", tmp_path)

    labels.write_bytes(gzip.compress(struct.pack(">II", 0x801, 60) + bytes(60))[:-8])  # gzip trailer cut off
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: not a valid gzip file"):
        load_idx("idx", tmp_path)

    write_idx(labels, np.full(60, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"label 10 .* mnist has 10 classes"):
        load_idx("mnist", tmp_path)


def test_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.name=mnist needs data.root.*train-images-idx3-ubyte\[.gz\]"):
        build_data(DataConfig(name="mnist"), seed=0)
    with pytest.raises(DataError, match=r"kmnist: folder .*nowhere does not exist.*t10k-labels-idx1-ubyte"):
        build_data(DataConfig(name="kmnist", root=str(tmp_path / "nowhere")), seed=0)
    make_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks t10k-images-idx3-ubyte\[.gz\]; expected train-images"):
        build_data(DataConfig(name="idx", root=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        build_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "nowhere")), seed=0)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_an_empty_root_names_each_expected_file_once(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name=name, root=str(tmp_path)), seed=0)
    message = str(info.value)
    assert f"{tmp_path} holds none of" in message, message
    files = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "cifar100": ["train", "test"]}
    expected = files.get(name, ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                                "t10k-labels-idx1-ubyte"])
    rest = message.replace(str(tmp_path), "")
    assert all(len(re.findall(rf"\b{f}\b", rest)) == 1 for f in expected), message


needs_fashion = pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="apt-get install dataset-fashion-mnist")


@needs_fashion
def test_fashion_mnist_real() -> None:
    bundle = build_data(DataConfig(), seed=0)
    assert (bundle.train_size, bundle.test_size, bundle.num_classes) == (60000, 10000, 10)
    assert (bundle.in_channels, bundle.input_size, bundle.name) == (1, 32, "fashion-mnist")
    assert torch.bincount(bundle.train.labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10
    x, y = next(iter(bundle.train))
    assert x.shape == (128, 1, 32, 32) and y.shape == (128,)
    assert bundle.train.images[:, :, :2].count_nonzero() == 0  # the zero padding from 28 to 32
    assert bundle.train.images[:, :, 2:30, 2:30].float().mean() > 50  # real clothes, not blank images


@needs_fashion
def test_fashion_mnist_md5_mismatch(tmp_path: Path) -> None:
    for stem in FILES.values():
        shutil.copy(FASHION_ROOT / f"{stem}.gz", tmp_path)
    corrupt = bytearray(gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()))
    corrupt[5000] ^= 0x01  # one pixel: header and size stay valid, only the checksum can tell
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(corrupt))
    assert load_idx("idx", tmp_path).test_images.shape == (10000, 1, 32, 32)  # a valid IDX file all the same
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: md5 .* corrupt or not Fashion-MNIST"):
        build_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), seed=0)
    corrupt[5000] ^= 0x01
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(corrupt))
    assert build_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), seed=0).test_size == 10000


# ---------------------------------------------------------------- TensorLoader


def loader(n: int = 1000, c: int = 3, side: int = 16, batch_size: int = 128, seed: int = 0,
           **kwargs: bool) -> TensorLoader:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, c, side, side), generator=gen, dtype=torch.uint8)
    mean, std = channel_stats(images)
    return TensorLoader(images, torch.arange(n), batch_size, mean, std, seed=seed, **kwargs)


def epoch_labels(tl: TensorLoader) -> torch.Tensor:
    return torch.cat([y for _, y in tl])


def test_tensor_loader_batches() -> None:
    tl = loader(n=1000, batch_size=128, shuffle=True, augment=True)
    assert len(tl) == 8
    batches = list(tl)
    assert [len(y) for _, y in batches] == [128] * 7 + [104]
    assert all(x.shape == (len(y), 3, 16, 16) and x.dtype == torch.float32 for x, y in batches)
    test = loader(n=1000, batch_size=300)
    assert len(test) == 4 and [len(y) for _, y in test] == [300, 300, 300, 100]
    assert epoch_labels(test).tolist() == list(range(1000))  # fixed order, nothing dropped
    assert epoch_labels(test).tolist() == list(range(1000))


def test_tensor_loader_shuffle_reproducible() -> None:
    a, b, other = loader(seed=5, shuffle=True, augment=True), loader(seed=5, shuffle=True, augment=True), \
        loader(seed=6, shuffle=True, augment=True)
    first, second = epoch_labels(a), epoch_labels(a)
    for order in (first, second):
        assert sorted(order.tolist()) == list(range(1000))  # every index exactly once per epoch
    assert not torch.equal(first, second)
    assert torch.equal(first, epoch_labels(b)) and torch.equal(second, epoch_labels(b))
    assert not torch.equal(first, epoch_labels(other))
    c, d = loader(seed=5, shuffle=True, augment=True), loader(seed=5, shuffle=True, augment=True)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(c, d, strict=True))  # augmentation too
    d.epoch = 0  # resuming at an epoch repeats it
    assert torch.equal(epoch_labels(d), first)


def test_random_crop_flip_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (300, 3, 8, 8), generator=gen, dtype=torch.uint8)
    out = random_crop_flip(images, gen, pad=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    seen = set()
    for i in range(len(images)):
        crops = {(dy, dx): padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                   if torch.equal(out[i], crop.flip(2) if flip else crop)]
        assert len(matches) == 1, f"image {i} is no single crop/flip of its source"
        seen.add(matches[0])
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) > 60  # of 81 offsets, with 300 draws


def test_augmentation_keeps_labels() -> None:
    labels = torch.arange(600) % 10
    images = (10 + 20 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    mean, std = channel_stats(images)
    tl = TensorLoader(images, labels, 64, mean, std, shuffle=True, augment=True, seed=0)
    padded_images = 0
    for x, y in tl:
        pixels = (x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).mul(255).round()
        code = (10 + 20 * y).view(-1, 1, 1, 1).float()
        assert ((pixels == code) | (pixels == 0)).all()  # the image's own label value or crop padding
        assert (pixels == code).flatten(1).sum(1).min() >= 28 * 28 * 3
        padded_images += int((pixels == 0).flatten(1).any(1).sum())
    assert padded_images > 400  # 80 of 81 offsets bring in padding


def test_normalisation() -> None:
    gen = torch.Generator().manual_seed(0)
    base, spread = torch.tensor([30.0, 120.0, 200.0]), torch.tensor([5.0, 20.0, 40.0])
    images = base.view(1, 3, 1, 1) + torch.randn(2000, 3, 8, 8, generator=gen) * spread.view(1, 3, 1, 1)
    images = images.clamp(0, 255).round().to(torch.uint8)
    mean, std = channel_stats(images)
    ref = images.double() / 255
    assert torch.allclose(mean.double(), ref.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), ref.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    x = torch.cat([x for x, _ in TensorLoader(images, torch.zeros(2000), 256, mean, std, shuffle=True)])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_subsets_and_calibration(tmp_path: Path) -> None:
    make_idx(tmp_path, n_train=300, n_test=100, sorted_labels=True)

    def build(seed: int, **kwargs: int) -> object:
        return build_data(DataConfig(name="idx", root=str(tmp_path), batch_size=32, **kwargs), seed=seed)

    a, b, c = (build(s, train_subset=50, test_subset=30) for s in (3, 3, 4))
    assert (a.train_size, a.test_size, len(a.train)) == (50, 30, 2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images) and not torch.equal(a.test.images, c.test.images)
    assert len(a.train.labels.unique()) >= 6  # the labels on disk are sorted by class; the subset mixes them
    full = build(3)
    whole_train = channel_stats(load_idx("idx", tmp_path).train_images)
    assert torch.equal(a.train.mean, whole_train[0]) and torch.equal(a.train.std, whole_train[1])

    batches = list(full.calib(25))  # more than one pass over the 10 batches of an epoch
    assert len(batches) == 25 and all(len(y) == 32 or len(y) == 300 % 32 for _, y in batches)
    plain = TensorLoader(full.train.images, full.train.labels, 300, full.train.mean, full.train.std)
    ((train_x, train_y),) = list(plain)
    train_set = {(int(y), x.numpy().tobytes()) for x, y in zip(train_x, train_y, strict=True)}
    # un-augmented: each calibration image is exactly one normalised training image, with its label
    assert all((int(y), x.numpy().tobytes()) in train_set
               for xs, ys in batches for x, y in zip(xs, ys, strict=True))
    with pytest.raises(DataError, match=r"data.train_subset=301 asks for more than the 300 train images"):
        build(0, train_subset=301)


# ---------------------------------------------------------------- CIFAR


def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, classes: int) -> dict[str, dict]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in files.items():
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n).tolist(), b"filenames": [b"x.png"] * n}
        if label_key == b"fine_labels":
            batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = batch
    return written


@pytest.mark.parametrize("use_subfolder", [True, False], ids=["parent", "folder"])
def test_cifar10(tmp_path: Path, use_subfolder: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    files = {f"data_batch_{i}": 4 + i for i in range(1, 6)} | {"test_batch": 9}
    written = write_cifar(folder, files, b"labels", 10)
    root = tmp_path if use_subfolder else folder
    data = load_cifar("cifar10", root)
    train_rows = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert data.train_images.shape == (sum(4 + i for i in range(1, 6)), 3, 32, 32)
    images = data.train_images.numpy()
    assert np.array_equal(images[:, 0].reshape(-1, 1024), train_rows[:, :1024])  # red plane
    assert np.array_equal(images[:, 2, 1], train_rows[:, 2048 + 32:2048 + 64])  # blue plane, row 1
    assert data.train_labels.tolist() == sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert data.test_labels.tolist() == written["test_batch"][b"labels"] and data.num_classes == 10
    bundle = build_data(DataConfig(name="cifar10", root=str(root), batch_size=8), seed=0)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes, bundle.test_size) == (3, 32, 10, 9)
    assert next(iter(bundle.train))[0].shape == (8, 3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    written = write_cifar(tmp_path / "cifar-100-python", {"train": 20, "test": 6}, b"fine_labels", 100)
    data = load_cifar("cifar100", tmp_path)
    assert data.train_labels.tolist() == written["train"][b"fine_labels"]
    assert data.test_labels.tolist() == written["test"][b"fine_labels"] and data.num_classes == 100


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.name=cifar10 needs data.root"):
        build_data(DataConfig(name="cifar10"), seed=0)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 3}, b"labels", 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_3; expected data_batch_1"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR pickle batch"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8)}))
    with pytest.raises(DataError, match=r"data_batch_3: expected a dict with keys b'data' and b'labels'"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8),
                                                         b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3: 3 images but 2 labels"):
        load_cifar("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"cifar100: .*holds none of train, test"):
        load_cifar("cifar100", tmp_path)


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the CIFAR archive: protocol 2, every str and bytes a byte string."""

    def save_bytes(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256 else \
            pickle.BINSTRING + len(data).to_bytes(4, "little")
        self.write(head + data)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_bytes}


def python2_pickle(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1 (the archive's) named its reconstructor numpy.core.multiarray; numpy 2 renamed the module
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class _RunsCode:
    """What a crafted batch hides: unpickling it calls os.system (a marker file shows whether it ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_cifar_batches_load_with_a_restricted_unpickler(tmp_path: Path) -> None:
    import pickletools

    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 3}, b"labels", 10)
    # data_batch_1 as the archive holds it (Python 2 byte strings, numpy 1 names); test_batch as pickle's newest
    # protocol writes it (numpy 2 names, _frombuffer)
    (folder / "data_batch_1").write_bytes(python2_pickle(written["data_batch_1"]))
    globals_used = {arg for op, arg, _ in pickletools.genops((folder / "data_batch_1").read_bytes())
                    if op.name == "GLOBAL"}
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    (folder / "test_batch").write_bytes(pickle.dumps(written["test_batch"], protocol=5))
    data = load_cifar("cifar10", tmp_path)
    assert np.array_equal(data.train_images[:3].numpy().reshape(3, -1), written["data_batch_1"][b"data"])
    assert data.test_labels.tolist() == written["test_batch"][b"labels"]

    marker = tmp_path / "ran"
    for protocol in (2, 5):  # GLOBAL and STACK_GLOBAL; the call hides among the file names
        batch = {**written["data_batch_2"], b"filenames": [b"x.png", _RunsCode(marker), b"x.png"]}
        (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=protocol))
        with pytest.raises(DataError, match=r"data_batch_2: refused to load: the pickle calls posix.system, which "
                                            r"no CIFAR batch needs"):
            load_cifar("cifar10", tmp_path)
        assert not marker.exists()  # nothing ran
    pickle.loads((folder / "data_batch_2").read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": __import__("builtins").eval}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: refused to load: the pickle calls __builtin__.eval"):
        load_cifar("cifar10", tmp_path)


# ---------------------------------------------------------------- ImageNet folders

COLOURS = {"n01": (230, 10, 10), "n02": (10, 230, 10), "n03": (10, 10, 230)}


def make_imagenet(root: Path, train: int = 4, val: int = 2, classes: dict = COLOURS) -> Path:
    """Noisy JPEGs of one dominant colour: the class can be read back after any crop, and different crops of
    the same file differ."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name, colour in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.asarray(colour) + rng.integers(-10, 11, (20, 24 + i, 3))
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{name}_{i}.JPEG")
    return root


def imagenet_cfg(root: Path, **kwargs: object) -> DataConfig:
    return DataConfig(**{"name": "imagenet", "root": str(root), "image_size": 16, "batch_size": 4,
                         "eval_batch_size": 5, "workers": 0, **kwargs})


@pytest.mark.parametrize("workers", [0, 1])
def test_imagenet_folders(tmp_path: Path, workers: int) -> None:
    root = make_imagenet(tmp_path)
    bundle = build_data(imagenet_cfg(root, workers=workers), seed=0)
    reference = datasets.ImageFolder(str(root / "val"))
    assert reference.class_to_idx == {"n01": 0, "n02": 1, "n03": 2}
    assert (bundle.train_size, bundle.test_size, bundle.num_classes) == (12, 6, 3)
    assert (bundle.in_channels, bundle.input_size, len(bundle.train), len(bundle.test)) == (3, 16, 3, 2)
    test = list(bundle.test)
    assert torch.cat([y for _, y in test]).tolist() == [label for _, label in reference.samples]
    for x, y in [*bundle.train, *test, *bundle.calib(4)]:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64
        assert torch.equal(x.mean(dim=(2, 3)).argmax(dim=1), y)  # dominant colour = class
    assert sum(len(y) for _, y in bundle.calib(4)) == 4 + 4 + 4 + 4
    # calibration sees the evaluation view of training files, training sees random crops of them
    view = eval_transform(16)
    train_files = [path for path, _ in datasets.ImageFolder(str(root / "train")).samples]
    centred = [view(Image.open(path).convert("RGB")) for path in train_files]

    def is_centred(x: torch.Tensor) -> bool:
        return any(torch.allclose(x, c, atol=1e-5) for c in centred)

    assert all(is_centred(x) for xs, _ in bundle.calib(3) for x in xs)
    assert sum(is_centred(x) for xs, _ in bundle.train for x in xs) <= 2
    subset = build_data(imagenet_cfg(root, train_subset=5, test_subset=4), seed=0)
    assert (subset.train_size, subset.test_size, len(subset.train)) == (5, 4, 2)


def test_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"imagenet: folder .*missing does not exist"):
        build_data(imagenet_cfg(tmp_path / "missing"), seed=0)
    (tmp_path / "a" / "train").mkdir(parents=True)
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(DataError, match=r"a/train holds no class folders"):
        build_data(imagenet_cfg(tmp_path / "a"), seed=0)
    root = make_imagenet(tmp_path / "b")
    for f in (root / "val" / "n02").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"b/val: .*n02"):
        build_data(imagenet_cfg(root), seed=0)
    root = make_imagenet(tmp_path / "c")
    shutil.rmtree(root / "val" / "n03")
    (root / "val" / "n04").mkdir()
    with pytest.raises(DataError, match=r"differ: only in train \['n03'\], only in val \['n04'\]"):
        build_data(imagenet_cfg(root), seed=0)


def test_a_ctrl_c_leaves_the_imagenet_loader_workers_alive(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the group; the trainer checkpoints at the next step, which
    needs the loader's workers (a worker that died of it fails the run)."""
    import multiprocessing
    import os
    import signal
    import time

    bundle = build_data(imagenet_cfg(make_imagenet(tmp_path), workers=2), seed=0)
    earlier = set(multiprocessing.active_children())  # children that earlier tests of the session left running
    batches = iter(bundle.train)
    next(batches), next(batches)  # batches 0 and 1 come from workers 0 and 1: both have run their init
    workers = [w for w in multiprocessing.active_children() if w not in earlier]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(1.0)
    assert all(w.is_alive() for w in workers)
    assert len([*batches, *bundle.train]) == 2 * len(bundle.train) - 2  # this epoch's rest and the next epoch
