"""Image classification data: a folder of class folders, or a table of image paths and labels.

Rows are ordinary :class:`Row` records (``where`` names the image file, or the table's ``file:line``), so the
split, the sample, the folds and the overlap check are the text path's own. Each usable image is decoded once
(Pillow), converted to the backbone's channels, resized to ``data.image_size`` square and kept as uint8; a batch
becomes ``pixel_values`` normalized with the backbone's mean and std, augmented first when it is a training
batch (``image_augment.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneguard.backbones import ImageSpec
from tuneguard.data.examples import Problems, class_index, label_index
from tuneguard.data.image_augment import augment_batch
from tuneguard.data.readers import Row, read_rows
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def folder_rows(root: Path, cfg: DataConfig) -> list[Row]:
    """ImageFolder's layout: ``root/<label>/<image>``, classes by folder name, files in sorted order."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = [Row(str(f), {cfg.image_field: str(f), cfg.label_field: d.name})
            for d in classes for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]  # macOS's ._x.png sidecars
    if not rows:
        raise TuneguardError(f"{root}: no images in class folders (expected {root}/<label>/<image>.png, "
                             f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return rows


def table_rows(path: Path, cfg: DataConfig) -> list[Row]:
    """A JSONL/CSV/TSV/Parquet table; each row's image path is resolved relative to the table's folder."""
    rows = read_rows(path, cfg.format, header=cfg.header, columns=cfg.columns)
    for row in rows:
        value = (row.fields or {}).get(cfg.image_field)
        if row.fields is not None and isinstance(value, str) and value.strip():
            image = Path(value.strip()).expanduser()
            row.fields[cfg.image_field] = str(image if image.is_absolute() else path.parent / image)
    return rows


def image_rows(path: str | Path, cfg: DataConfig) -> list[Row]:
    """The rows of a class-folder tree or of a table of image paths."""
    path = Path(path)
    return folder_rows(path, cfg) if path.is_dir() else table_rows(path, cfg)


@dataclass(frozen=True)
class ImagePipeline:
    """How stored images become a batch: the backbone's normalization, and the training augmentation."""

    spec: ImageSpec
    cfg: DataConfig
    seed: int

    def batch(self, rows: list[ImageExample], epoch: int | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values`` and ``labels``; with an ``epoch`` (training batches only) augmented first."""
        images = torch.stack([r.pixels for r in rows]).float() / 255
        if epoch is not None and self.cfg.image_augment:
            images = augment_batch(images, [r.index for r in rows], self.cfg, self.seed, epoch)
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return {"pixel_values": (images - mean) / std, "labels": torch.tensor([r.label for r in rows])}


@dataclass
class ImageExample:
    pixels: torch.Tensor
    """(channels, size, size) uint8."""
    label: int
    index: int
    """The row's position among the training rows: with the seed and epoch, it picks its augmentation."""
    where: str
    pipeline: ImagePipeline


def _eight_bit(img: Any, path: str) -> Any:
    """16-bit greyscale scaled to 8 bits (Pillow's ``convert`` clips it: most pixels of a 16-bit scan read 255);
    32-bit integer and float pixels have no fixed range, so they are refused."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        raise ValueError(f"unreadable image {path}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels "
                         "have no fixed 8-bit scale; save it with 8 or 16 bits a channel")
    return img


def decode(path: str, channels: int, size: int) -> torch.Tensor:
    """An image file as a (channels, size, size) uint8 tensor (bilinear resize); ValueError naming the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = _eight_bit(img, path)
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image {path}: {exc}") from None
    if channels not in (1, 3):
        raise ValueError(f"the backbone takes {channels} channels; images are read as 1 (grey) or 3 (RGB)")
    return data.view(size, size, channels).permute(2, 0, 1).contiguous()


def build_images(rows: list[Row], cfg: DataConfig, pipeline: ImagePipeline, what: str,
                 problems: Problems) -> list[ImageExample]:
    """Decode each row's image with its class index; bad rows are counted and named, and fail past the allowed fraction."""
    mapping, _ = label_index(cfg)
    out = []
    for index, row in enumerate(rows):
        fields = row.fields or {}
        try:
            if row.problem:
                raise ValueError(row.problem)
            if not isinstance(fields.get(cfg.image_field), str):
                raise ValueError(f"missing field '{cfg.image_field}' (the image's path)")
            label = class_index(fields, cfg, mapping)
            pixels = decode(fields[cfg.image_field], pipeline.spec.channels, cfg.image_size)
        except ValueError as exc:
            problems.add(row.where, str(exc))
            continue
        out.append(ImageExample(pixels, label, index, row.where, pipeline))
    problems.check(len(rows), cfg.max_bad_fraction, what)
    return out


@dataclass(frozen=True)
class ImageItems:
    """A recipe's validation images as an evaluation task's payload (``Task.external``): the scorer batches them
    without augmentation, and the score cache keys them by their pixels."""

    examples: list[ImageExample]

    def config_hash(self) -> str:
        """The images' bytes and normalization: a score cached for other pixels is never reused."""
        digest = hashlib.sha256(repr(self.examples[0].pipeline.spec if self.examples else None).encode())
        for e in self.examples:
            digest.update(e.pixels.numpy().tobytes())
        return digest.hexdigest()[:16]
