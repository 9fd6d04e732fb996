"""Tile preview: the tiles of a tile table outlined on the slide thumbnail, saved as PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from embedstore._atomic import atomic_file, check_replaceable
from embedstore._schema import META_KIND, Col
from embedstore.slides import Slide
from embedstore.tile_table import tile_geometry, tile_origin

LOG = logging.getLogger(__name__)

__all__ = ["check_preview_out", "draw_tile_preview"]

PREVIEW_KIND = "tile_preview"


def check_preview_out(path: str | Path) -> None:
    """Refuse (:class:`BadInput`, nothing touched) a preview path holding a file embedstore did not write."""
    check_replaceable(path, PREVIEW_KIND, what="tile preview (.png)", option="--preview")


def draw_tile_preview(slide: Slide, table: pa.Table, png_path: str | Path, max_size: int = 1024) -> Path:
    """Draw the tiles of a table on the slide thumbnail and save it as PNG (atomically).

    Tiles are outlined green, padded (border) tiles orange. The PNG carries
    ``embedstore.kind = "tile_preview"``, so that a later run may replace it.

    Returns
    -------
    The path written.
    """
    from PIL import ImageDraw
    from PIL.PngImagePlugin import PngInfo

    png_path = Path(png_path)
    thumb = slide.thumbnail(max_size).convert("RGB")
    sx = thumb.width / slide.dimensions[0]
    sy = thumb.height / slide.dimensions[1]
    draw = ImageDraw.Draw(thumb)
    xs = table[Col.X].to_numpy()
    ys = table[Col.Y].to_numpy()
    mpps = table[Col.MPP].to_numpy()
    sizes = table[Col.SIZE_PX].to_numpy()
    padded = table[Col.PADDED].to_numpy(zero_copy_only=False)
    for x, y, m, s, p in zip(xs, ys, mpps, sizes, padded, strict=True):
        side0 = tile_geometry(slide.mpp, float(m), int(s))
        x0, y0 = int(tile_origin(x, side0)), int(tile_origin(y, side0))
        box = (x0 * sx, y0 * sy, (x0 + side0) * sx, (y0 + side0) * sy)
        draw.rectangle(box, outline=(255, 140, 0) if p else (0, 160, 0), width=1)
    check_preview_out(png_path)
    info = PngInfo()
    info.add_text(META_KIND, PREVIEW_KIND)
    with atomic_file(png_path) as tmp:
        thumb.save(tmp, format="PNG", pnginfo=info)
    LOG.info("wrote tile preview %s (%d tiles)", png_path, len(table))
    return png_path
