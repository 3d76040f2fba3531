"""DALI's CPU pipeline against a torchvision DataLoader: images per second on the same JPEG folder.

Both apply the ImageNet training transforms (random resized crop to 224, horizontal flip, normalisation
to float NCHW) with the same number of workers (DALI threads / DataLoader worker processes) and batch
size; rounds alternate the two so that drift on a shared machine hits both alike. The folder is made
from the 20 real ImageNet photos shipped with foolbox 3.3.4, re-encoded at ImageNet-like sizes (random
crops and scales, about 500x375).

    python tools/bench_dali.py --images 400 --workers 2 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

START, END = "<!-- bench_dali:start -->", "<!-- bench_dali:end -->"


def make_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    train = root / "train"
    if train.is_dir() and sum(1 for _ in train.glob("*/*.jpg")) == count:
        return root
    photos = sorted((Path(importlib.util.find_spec("foolbox").origin).parent / "data").glob("imagenet_*.jpg"))
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(400, 640)), int(rng.integers(300, 480)))
        folder = train / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.crop((x, y, x + cw, y + ch)).resize(size).save(folder / f"img{i:05d}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)  # unused; keeps the ImageNet layout
    return root


def rate(batches, count: int) -> float:
    """Images per second over one full pass, the first batch (start-up) excluded."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for x, _ in it:
        seen += len(x)
    assert seen >= count // 2
    return seen / (time.perf_counter() - start)


def dali_loader(root: Path, batch: int, workers: int):
    from cap.data.dali_loader import DaliFolderLoader
    from dali_pipelines import imagenet_train_pipeline

    pipe = imagenet_train_pipeline(str(root / "train"), crop=224, shard_id=0, num_shards=1, reader_seed=0,
                                   batch_size=batch, num_threads=workers, device_id=None, seed=0)
    return DaliFolderLoader(pipe, last_batch="DROP", where=str(root))


def torch_loader(root: Path, batch: int, workers: int):
    from torchvision import datasets

    from cap.data.imagenet import train_transform

    dataset = datasets.ImageFolder(str(root / "train"), transform=train_transform(224))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=True, drop_last=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("bench_out/dali_jpegs"))
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; the workers do the work in both cases
    root = make_folder(args.folder, args.images)
    loaders = {"DALI (CPU)": dali_loader(root, args.batch, args.workers),
               "torchvision DataLoader": torch_loader(root, args.batch, args.workers)}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(args.rounds):
        for name, loader in loaders.items():
            rates[name].append(rate(loader, args.images))
            print(f"round {r} {name}: {rates[name][-1]:.1f} images/s", flush=True)
    dali, tv = statistics.median(rates["DALI (CPU)"]), statistics.median(rates["torchvision DataLoader"])
    command = "python tools/bench_dali.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"Command: `{command}` ({os.cpu_count()} CPU cores; {args.images} JPEGs of about 500x375; random resized "
        f"crop 224 + flip + normalise; batch {args.batch}; {args.workers} DALI threads against {args.workers} "
        f"DataLoader workers; median of {args.rounds} alternating passes)", "",
        "| loader | images/s | vs torchvision |", "|---|---|---|",
        f"| torchvision DataLoader (PIL) | {tv:.0f} | 1.00 |",
        f"| DALI 2.4, CPU mode | {dali:.0f} | {dali / tv:.2f} |"])
    print(text)
    if args.write_docs:
        write_block(args.write_docs, START, END, text)


if __name__ == "__main__":
    main()
