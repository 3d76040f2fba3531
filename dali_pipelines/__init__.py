"""DALI input pipelines for cap: ImageNet-style JPEG folders and in-memory image arrays.

Each pipeline decodes and augments on the GPU when given a `device_id` (decoding on "mixed") and on the
CPU when `device_id` is None (DALI 2.x's CPU-only mode), with no other change. Sharding follows the
global rank: shard_id = rank over all nodes, num_shards = world size.
"""

from dali_pipelines.arrays import ArraySource, array_pipeline
from dali_pipelines.folders import FolderError, scan_image_folder
from dali_pipelines.imagenet import imagenet_train_pipeline, imagenet_val_pipeline

__all__ = ["ArraySource", "FolderError", "array_pipeline", "imagenet_train_pipeline", "imagenet_val_pipeline",
           "scan_image_folder"]
