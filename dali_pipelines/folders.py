"""Checks of an ImageNet-style class-folder tree before DALI reads it, so that a malformed folder gives an
error that names the folder and what is wrong, instead of a reader failure deep inside a pipeline."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".pbm"}
"""the image types fn.readers.file picks up by default (its file_filters), compared case-insensitively"""


class FolderError(ValueError):
    """The image folder is missing, has no class folders, an empty class, or files that are not images."""


def scan_image_folder(root: str | Path) -> tuple[list[str], int]:
    """(sorted class names, number of images) of root/<class>/<image>; raises FolderError when malformed.

    Classes are sorted by name and numbered from 0, as both torchvision's ImageFolder and DALI's file reader
    number them."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"image folder {root} does not exist; expected {root}/<class>/<image files>")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise FolderError(f"image folder {root} holds no class folders; expected {root}/<class>/<image files>")
    total, empty, strangers = 0, [], []
    for name in classes:
        files = [f for f in (root / name).iterdir() if f.is_file() and not f.name.startswith(".")]
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        strangers += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            empty.append(name)
        total += len(images)
    if empty:
        raise FolderError(f"image folder {root}: class folder(s) without a single image: "
                          f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    if strangers:
        raise FolderError(f"image folder {root}: {len(strangers)} file(s) that are not images by their type "
                          f"({', '.join(str(f) for f in strangers[:3])}{' ...' if len(strangers) > 3 else ''}); "
                          f"allowed: {', '.join(sorted(IMAGE_SUFFIXES))}")
    return classes, total
