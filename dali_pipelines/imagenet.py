"""ImageNet training and validation pipelines over root/<class>/<image> folders.

Training: fn.readers.file (the whole file list reshuffled after every epoch with a seed shared by all
ranks, so the shards stay disjoint), decoding fused with a random resized crop (area 8-100 %, aspect
3/4-4/3), resize to the crop size, random horizontal flip, normalisation to float NCHW.
Validation: decode, resize the shorter side to 256/224 of the crop, centre crop, normalise (in file
order; `shuffle=True` gives the un-augmented, shuffled view used to re-estimate BatchNorm).

Sharding: shard_id = global rank, num_shards = world size; pad_last_batch=True pads every shard to the
same whole number of batches by repeating its last sample. The framework iterator
(cap.data.dali_loader) then DROPs the last partial training batch (every rank takes the same number of
full steps) and, for validation, strips the padding (PARTIAL), so every image counts exactly once.
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
READER = "Reader"


@pipeline_def(enable_conditionals=False)
def imagenet_train_pipeline(file_root: str, crop: int, shard_id: int, num_shards: int, reader_seed: int,
                            decoder_device: str = "cpu"):
    jpegs, labels = fn.readers.file(file_root=file_root, shard_id=shard_id, num_shards=num_shards,
                                    shuffle_after_epoch=True, seed=reader_seed, pad_last_batch=True, name=READER)
    images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                           random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=100)
    images = fn.resize(images, resize_x=crop, resize_y=crop)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                      mirror=fn.random.coin_flip(probability=0.5))
    return images, labels


@pipeline_def(enable_conditionals=False)
def imagenet_val_pipeline(file_root: str, crop: int, shard_id: int, num_shards: int, decoder_device: str = "cpu",
                          shuffle: bool = False, reader_seed: int = 0):
    jpegs, labels = fn.readers.file(file_root=file_root, shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=shuffle, seed=reader_seed, pad_last_batch=True, name=READER)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(crop * 256 / 224))
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(crop, crop),
                                      mean=MEAN, std=STD)
    return images, labels


def decoder_device(device_id: int | None) -> str:
    """"mixed" (nvJPEG on the GPU, output on the GPU) with a device, the CPU decoder without one."""
    return "mixed" if device_id is not None else "cpu"
