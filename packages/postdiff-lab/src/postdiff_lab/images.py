"""Small image helpers: grids of labelled images, written atomically as PNG or JPEG (by the file's suffix)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from postdiff.files import atomic_write
from postdiff.loop.arrays import to_uint8

# what an image output path may end in, and the format written for it
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def save_png(image, path: str | Path) -> Path:
    return _atomic_save(Image.fromarray(to_uint8(image)), Path(path))


def save_grid(rows: Sequence[Sequence], path: str | Path, *, row_labels: Sequence[str] = (), scale: int = 1) -> Path:
    """One row per entry of ``rows`` (e.g. one per plan), images side by side, an optional label on the left."""
    tiles = [[to_uint8(im) for im in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    h, w = h * scale, w * scale
    label_w = 8 * max((len(s) for s in row_labels), default=0) + (8 if row_labels else 0)
    cols = max(len(r) for r in tiles)
    pad = 2
    canvas = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(tiles) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        y = pad + r * (h + pad)
        if r < len(row_labels):
            draw.text((4, y + h // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for c, tile in enumerate(row):
            im = Image.fromarray(tile)
            if scale != 1:
                im = im.resize((w, h), Image.NEAREST)
            canvas.paste(im, (label_w + pad + c * (w + pad), y))
    return _atomic_save(canvas, Path(path))


def _atomic_save(image: Image.Image, path: Path) -> Path:
    fmt = IMAGE_FORMATS.get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))
