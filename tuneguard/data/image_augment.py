"""Seeded image augmentation in plain torch: rotation, zoom, flips, brightness and contrast.

Training images get fresh transforms every epoch (as a torchvision ``transforms`` pipeline in a
``Dataset`` would give them), drawn from a generator seeded by ``train.seed``, the epoch and the image's
row: the same seed gives the same pixels, however the rows fall into batches or processes, and a resumed
run sees what an uninterrupted one saw. Rotation and zoom are one affine resampling (``affine_grid`` +
``grid_sample``, bilinear, zeros outside the image, as torchvision's ``RandomAffine`` fills by default); flips
are exact. Validation and evaluation images are never augmented. torchvision is not used: its PyPI wheels
are built against one torch release each and fail to load beside another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneguard.recipe import DataConfig

_MIX = 1_000_003


@dataclass(frozen=True)
class Draw:
    """One image's transform parameters (each used only where its operation is listed)."""

    degrees: float
    zoom: float
    hflip: bool
    vflip: bool
    brightness: float
    contrast: float


def draw(cfg: DataConfig, seed: int, epoch: int, index: int) -> Draw:
    """The parameters of row ``index`` in ``epoch``: six uniform numbers from its own seeded generator."""
    generator = torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + index) % 2**63)
    u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    low, high = cfg.image_scale
    return Draw(
        degrees=(2 * u[0] - 1) * cfg.image_rotate_degrees,
        zoom=low + u[1] * (high - low),
        hflip=u[2] < 0.5,
        vflip=u[3] < 0.5,
        brightness=1 + (2 * u[4] - 1) * cfg.image_color,
        contrast=1 + (2 * u[5] - 1) * cfg.image_color,
    )


def rotate_zoom(images: torch.Tensor, degrees: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W), each turned its ``degrees`` counter-clockwise about its centre and magnified ``zoom``
    times (one value per image). Each output pixel samples the input at the inverse transform of its centre
    (bilinear); pixels from outside the image are 0."""
    angle = torch.deg2rad(degrees.double())
    cos, sin = torch.cos(angle) / zoom.double(), torch.sin(angle) / zoom.double()
    height, width = images.shape[-2:]
    zero = torch.zeros_like(cos)
    # affine_grid works in [-1, 1] per axis; the aspect ratio keeps a rotation of a non-square image rigid.
    theta = torch.stack([torch.stack([cos, -sin * height / width, zero], -1),
                         torch.stack([sin * width / height, cos, zero], -1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def adjust_color(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` on [0, 1] pixels, one factor per image: scale by ``brightness``, then blend
    with the image's mean grey level by ``contrast``; clipped to [0, 1]."""
    images = (images * brightness.view(-1, 1, 1, 1).to(images.dtype)).clamp(0, 1)
    weights = torch.tensor([0.299, 0.587, 0.114] if images.shape[1] == 3 else [1 / images.shape[1]] * images.shape[1],
                           dtype=images.dtype)
    grey = (images * weights.view(1, -1, 1, 1)).sum(1).mean((-2, -1)).view(-1, 1, 1, 1)
    return ((images - grey) * contrast.view(-1, 1, 1, 1).to(images.dtype) + grey).clamp(0, 1)


def flip_where(images: torch.Tensor, chosen: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``chosen`` images (a bool per image) mirrored along ``dim``: -1 left-right, -2 top-bottom."""
    return torch.where(chosen.view(-1, 1, 1, 1), images.flip(dim), images)


def augment(images: torch.Tensor, draws: list[Draw], ops: list[str]) -> torch.Tensor:
    """``images`` (N, C, H, W, values in [0, 1]), each with its draw of the listed operations: geometry, then colour."""
    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(d, name) for d in draws])

    if "rotate" in ops or "scale" in ops:
        degrees = column("degrees") if "rotate" in ops else torch.zeros(len(draws))
        images = rotate_zoom(images, degrees, column("zoom") if "scale" in ops else torch.ones(len(draws)))
    if "hflip" in ops:
        images = flip_where(images, column("hflip"), -1)
    if "vflip" in ops:
        images = flip_where(images, column("vflip"), -2)
    if "color" in ops:
        images = adjust_color(images, column("brightness"), column("contrast"))
    return images


def augment_batch(images: torch.Tensor, indices: list[int], cfg: DataConfig, seed: int, epoch: int) -> torch.Tensor:
    """A batch (N, C, H, W) of training images, each augmented by the draw of its row and the epoch."""
    return augment(images, [draw(cfg, seed, epoch, i) for i in indices], cfg.image_augment)
