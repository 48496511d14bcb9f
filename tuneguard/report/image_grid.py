"""``tuneguard data preview`` for images: a PNG grid, each training image beside its augmented copies."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from tuneguard.data.preview import ImagePreview
from tuneguard.io import atomic_write_bytes
from tuneguard.report.plots import png_bytes, short

NAME_CHARS = 16
"""A file name's width on the grid: longer ones ran into the rows above and below."""


def write_image_grid(path: Path, rows: list[ImagePreview], title: str) -> None:
    """One row per image: the original (as validation sees it), then one column per training epoch."""
    columns = rows[0].images.shape[0]
    fig = Figure(figsize=(1.3 * columns, 1.4 * len(rows) + 0.6), layout="constrained")  # no band under the title
    fig.suptitle(title, fontsize=9)
    for r, row in enumerate(rows):
        for c, image in enumerate(row.images):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            pixels = image.permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"epoch {c - 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{short(Path(row.where).name, NAME_CHARS, middle=True)}\n'{row.answer}'", fontsize=8)
    atomic_write_bytes(path, png_bytes(fig))
