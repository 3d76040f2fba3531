"""DALI pipelines for real, in DALI's CPU mode: a JPEG folder in ImageNet layout (20 real ImageNet photos
shipped with foolbox 3.3.4 plus generated images), the in-memory array pipeline, sharding, a training run,
and the errors for malformed folders."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cap.data import DataError, build_data
from cap.engine.config import build_config

pytestmark = pytest.mark.dali
pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Dog", "ant", "bee", "cat", "zebra_1"]  # sorting puts the capital first: a real ordering check


def foolbox_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.fail("foolbox==3.3.4 (installed --no-deps by tools/bootstrap.sh) provides the ImageNet test photos")
    photos = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    assert len(photos) == 20
    return photos


def generated(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :] * np.linspace(0.2, 1, h, dtype=np.float32)[:, None]
    channels = 3 if mode == "RGB" else 1
    pixels = np.clip(ramp[..., None] + rng.normal(0, 20, (h, w, channels)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, quality=90)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/: the 20 photos spread over 5 classes, plus generated RGB and greyscale JPEGs."""
    root = tmp_path_factory.mktemp("imagenet")
    for i, photo in enumerate(foolbox_photos()):
        split = "train" if i < 15 else "val"
        folder = root / split / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            generated(folder / f"gen_rgb_{c}.jpg", (300 + 20 * c, 200 + 10 * c), "RGB", c)
            generated(folder / f"gen_grey_{c}.JPEG", (180, 260), "L", 100 + c)
    return root


def imagenet_cfg(root: Path, *overrides: str):
    return build_config({"data": {"name": "imagenet", "root": str(root), "loader": "dali", "batch_size": 4,
                                  "eval_batch_size": 4, "workers": 2}}, list(overrides)).data


def digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def test_decoding_matches_pil_exactly(imagenet_root):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def
    def decode(file_root):
        jpegs, labels = fn.readers.file(file_root=file_root)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    files = sorted((imagenet_root / "train").glob("*/*"))
    pipe = decode(str(imagenet_root / "train"), batch_size=len(files), num_threads=2, device_id=None)
    pipe.build()
    images, _ = pipe.run()
    worst = 0
    for i, path in enumerate(files):
        ours, pil = np.asarray(images.at(i)).astype(int), np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert ours.shape == pil.shape, path
        worst = max(worst, int(np.abs(ours - pil).max()))
    assert worst <= 1, f"DALI's CPU decoder differs from PIL by up to {worst} grey levels"  # measured: 0


def test_validation_pipeline_matches_imagefolder_labels_and_transform(imagenet_root):
    from torchvision import datasets

    from cap.data.imagenet import eval_transform

    data = build_data(imagenet_cfg(imagenet_root), seed=0)
    batches = list(data.test)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    folder = datasets.ImageFolder(str(imagenet_root / "val"), transform=eval_transform(224))
    assert folder.classes == CLASSES and data.num_classes == len(CLASSES)
    assert labels.tolist() == folder.targets, "labels must map as torchvision's ImageFolder maps them"
    assert images.shape == (len(folder), 3, 224, 224) and images.dtype == torch.float32
    # Same decoder (exact, above); the resize filters differ (DALI's linear with antialiasing against PIL's
    # bilinear). Measured on the photos: mean |diff| 0.002-0.003, max 0.018 in normalised units (about one
    # grey level); on the generated pixel noise, upscaled, mean up to 0.15.
    for i, (path, _) in enumerate(folder.samples):
        diff = (images[i] - folder[i][0]).abs()
        photo = Path(path).name.startswith("imagenet_")
        assert float(diff.mean()) < (0.01 if photo else 0.25), (path, float(diff.mean()))
        if photo:
            assert float(diff.max()) < 0.05, (path, float(diff.max()))


def test_training_pipeline_shapes_normalisation_and_randomness(imagenet_root):
    data = build_data(imagenet_cfg(imagenet_root, "data.image_size=64"), seed=0)
    first = [b for b in data.train]
    second = [b for b in data.train]
    assert len(first) == len(data.train) == 25 // 4  # the last partial training batch is dropped
    x, y = first[0]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -2.5 < float(x.min()) and float(x.max()) < 2.8  # (pixel/255 - mean) / std range of ImageNet stats
    assert not torch.equal(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in second])), \
        "random crops, flips and order must change between epochs"


def test_two_shards_cover_every_image_exactly_once(imagenet_root):
    seen = []
    for rank in (0, 1):  # global ranks: what RANK is on two nodes of one process each
        data = build_data(imagenet_cfg(imagenet_root), seed=0, rank=rank, world_size=2)
        seen += [digest(img) for x, _ in data.test for img in x]
    everything = [digest(img) for x, _ in build_data(imagenet_cfg(imagenet_root), seed=0).test for img in x]
    assert sorted(seen) == sorted(everything) and len(everything) == 15


def test_array_pipeline_shards_and_augments_like_the_torch_loader():
    cfg = build_config({"data": {"name": "fashion-mnist", "train_subset": 200, "test_subset": 101,
                                 "batch_size": 32, "eval_batch_size": 16, "loader": "dali"}}).data
    torch_cfg = build_config({"data": {**vars(cfg), "loader": "torch"}}).data
    dali, plain = build_data(cfg, seed=0), build_data(torch_cfg, seed=0)
    dx, dy = map(torch.cat, zip(*dali.test, strict=True))
    tx, ty = map(torch.cat, zip(*plain.test, strict=True))
    assert torch.equal(dy, ty) and torch.allclose(dx, tx, atol=1e-5), "un-augmented batches equal the torch path"
    labels = [torch.cat([y for _, y in build_data(cfg, 0, rank=r, world_size=2).test]) for r in (0, 1)]
    assert sorted(torch.cat(labels).tolist()) == sorted(ty.tolist()) and len(torch.cat(labels)) == 101
    xa, _ = next(iter(dali.train))
    assert xa.shape == (32, 1, 32, 32) and xa.dtype == torch.float32


def test_array_augmentation_is_a_padded_random_crop_and_flip():
    """Every output equals the input shifted by -4..4 pixels in each direction (zeros coming in) and maybe
    mirrored, as cap's TensorLoader augments; and the shifts vary."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from dali_pipelines import ArraySource, array_pipeline

    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 12, 10, 1), dtype=np.uint8)  # no zero pixel: zeros can only be padding
    source = ArraySource(images, np.arange(64), 64, shuffle=False, seed=0)
    pipe = array_pipeline(source, [0.0], [1 / 255], True, batch_size=64, num_threads=1, device_id=None, seed=3)
    pipe.build()
    out = next(iter(DALIGenericIterator([pipe], ["x", "y"])))[0]["x"][:, 0]  # normalised with mean 0, std 1/255
    padded = torch.nn.functional.pad(torch.from_numpy(images[..., 0]).float(), (4, 4, 4, 4))
    found = set()
    for i in range(64):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, dy:dy + 12, dx:dx + 10]))]
        assert matches, f"image {i} is not a padded crop (+flip) of its input"
        found.add(matches[0])
    assert len(found) > 20, "crop offsets and flips must vary"


def test_resume_of_the_array_loader_continues_the_same_pass():
    cfg = build_config({"data": {"name": "fashion-mnist", "train_subset": 100, "batch_size": 16,
                                 "loader": "dali", "augment": False}}).data
    full = [y for _, y in build_data(cfg, seed=0).train]
    resumed = build_data(cfg, seed=0).train
    resumed.start_batch = 3
    assert [y.tolist() for _, y in resumed] == [y.tolist() for y in full[3:]]


@pytest.mark.parametrize("damage,message", [
    ("empty_class", "without a single image"),
    ("text_file", "not images by their type"),
    ("no_classes", "holds no class folders"),
    ("corrupt_jpeg", "DALI could not read"),
])
def test_malformed_folders_give_clear_errors(imagenet_root, tmp_path, damage, message):
    root = tmp_path / "broken"
    shutil.copytree(imagenet_root, root)
    if damage == "empty_class":
        (root / "train" / "ant").mkdir(exist_ok=True)
        for f in (root / "train" / "ant").iterdir():
            f.unlink()
        (root / "val" / "ant").mkdir(exist_ok=True)
    elif damage == "text_file":
        (root / "train" / "bee" / "notes.txt").write_text("not an image")
    elif damage == "no_classes":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
        (root / "val" / "loose.jpg").write_bytes((root / "train" / "cat" / "gen_rgb_3.jpg").read_bytes())
    elif damage == "corrupt_jpeg":
        (root / "val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg" * 10)
    with pytest.raises(DataError, match=message):
        data = build_data(imagenet_cfg(root), seed=0)
        for _ in data.test:
            pass


def test_missing_dali_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what an environment without DALI looks like
    cfg = build_config({"data": {"name": "fashion-mnist", "train_subset": 100, "loader": "dali"}}).data
    with pytest.raises(DataError, match="needs NVIDIA DALI"):
        build_data(cfg, seed=0)


@pytest.mark.slow
def test_cap_train_fed_by_dali_prunes_and_finishes(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--config", "configs/smoke.yaml", "--out", str(out),
                           "data.loader=dali", "train.epochs=3", "train.progress=false", "tracking.enabled=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prune_events"] and summary["units_kept"] < summary["units_total"]
    assert summary["test_acc"] > 0.4
    history = json.loads((out / "history.json").read_text())
    assert all(h["test_seen"] == 1000 for h in history)


@pytest.mark.slow
def test_cap_train_on_an_imagenet_folder_through_dali(imagenet_root, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--out", str(out), "model.name=resnet18",
                           "data.name=imagenet", f"data.root={imagenet_root}", "data.loader=dali", "data.image_size=64",
                           "data.batch_size=8", "data.eval_batch_size=8", "train.epochs=2", "prune.warmup_epochs=0",
                           "prune.tau=1", "prune.eta=0.2", "prune.check_every=1", "prune.bn_batches=2",
                           "train.progress=false", "tracking.enabled=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["test_seen"] for h in history] == [15, 15], "every validation image exactly once per evaluation"
    assert json.loads((out / "summary.json").read_text())["steps_per_epoch"] == 25 // 8


def test_a_training_shard_smaller_than_one_batch_is_a_clear_error(imagenet_root, tmp_path):
    # 25 training images, batch 64: the training pipeline drops its last partial batch, so no step is left
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--out", str(out), "model.name=resnet18",
                           "data.name=imagenet", f"data.root={imagenet_root}", "data.loader=dali", "data.image_size=64",
                           "data.batch_size=64", "tracking.enabled=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "25 training images make no full batch of data.batch_size=64 per process" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_dali_under_a_simulated_two_node_ddp_job(tmp_path):
    from tests.test_distributed import _check_ddp_run, _torchrun, free_port

    out, port = tmp_path / "nodes", free_port()
    nodes = [_torchrun(out, ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                             f"--master_port={port}"], "data.loader=dali") for rank in (0, 1)]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    _check_ddp_run(out, logs[0])  # identical final weights on both ranks, each test image counted once


def test_cifar_pickles_through_dali_equal_the_torch_path(tmp_path):
    from tests.test_data import write_cifar

    write_cifar(tmp_path / "cifar-10-batches-py", {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 11},
                b"labels", 10)
    cfg = {"name": "cifar10", "root": str(tmp_path), "batch_size": 8, "eval_batch_size": 4}
    dali = build_data(build_config({"data": {**cfg, "loader": "dali"}}).data, seed=0)
    plain = build_data(build_config({"data": cfg}).data, seed=0)
    dx, dy = map(torch.cat, zip(*dali.test, strict=True))
    tx, ty = map(torch.cat, zip(*plain.test, strict=True))
    assert dx.shape == (11, 3, 32, 32) and torch.equal(dy, ty) and torch.allclose(dx, tx, atol=1e-5)
    assert next(iter(dali.train))[0].shape == (8, 3, 32, 32)
