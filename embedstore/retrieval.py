"""Content-based tile retrieval: the tiles of a store that look like a stored tile, a picture or a gene list.

One orchestrating function, :func:`search`. A query tile's stored vector, a picture encoded
by the store's own encoder (same fingerprint, same preprocessing, taken at the store's tile
geometry), or a gene sentence encoded by the text tower of the same checkpoint (zero-shot,
OmiCLIP; :mod:`embedstore.store._text_query`) goes through :func:`embedstore.tile_index.nearest_tiles`; the hits can be written
as Parquet and drawn as a mosaic read back from the slides they were embedded from.

The module is not called ``search``: ``embedstore.search`` is the public function, and a
submodule of that name would replace it on the package once imported.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable
from embedstore._params import check
from embedstore._progress import step
from embedstore._schema import META_ENCODER, META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION, Col
from embedstore.errors import BadInput, EmbedstoreError, FingerprintMismatch
from embedstore.store import Store, open_store
from embedstore.store._text_query import image_encoder, measured_genes, recorded_weights, text_vector
from embedstore.tile_index import list_slides, nearest_tiles, resolve_encoder, tile_vector

LOG = logging.getLogger(__name__)

__all__ = ["HITS_KIND", "MOSAIC_KIND", "mosaic_shape", "search"]

HITS_KIND = "search_hits"
MOSAIC_KIND = "search_mosaic"
META_QUERY = "embedstore.query"  # JSON: what was searched for (slide and tile, or image)

# Mosaic layout: at most this many cells a row, each CELL_PX wide and CELL_PX + CAPTION_PX high.
MOSAIC_COLUMNS = 6
CELL_PX = 200
CAPTION_PX = 40
PAD_PX = 6
DPI = 100
MISSING_GREY = 190


def search(
    store: str | Path | Store,
    *,
    slide: str | None = None,
    tile: str | None = None,
    image: str | Path | None = None,
    text: str | None = None,
    k: int = 20,
    encoder: str | None = None,
    cohort: str | None = None,
    slides: Sequence[str] | None = None,
    exclude_slides: Sequence[str] | None = None,
    weights: str | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    device: str = "auto",
) -> pa.Table:
    """The ``k`` tiles of a store most similar to a stored tile or to a picture of one.

    Parameters
    ----------
    store
        Store folder (or an open :class:`~embedstore.store.Store`).
    slide, tile
        Query by a stored tile: its slide id and tile id (``"x_y"``, its level-0 centre).
    image
        Query by a picture (PNG, JPEG, TIFF) of one tile, taken to be at the store's µm/px;
        resized to the store's tile size when it is not that size (a non-square picture is
        first cropped to its centre square). It is encoded by the store's encoder, rebuilt
        from the metadata stored with the embeddings.
    text
        Query by gene symbols (``"ERBB2 GRB7 KRT19"``, a marker list or a gene sentence),
        zero-shot: embedded by the text tower of the checkpoint the tiles were embedded with
        (an open_clip CLIP/CoCa encoder such as OmiCLIP). Words that are not genes measured in
        the store are dropped; none left is an error.
    k
        Tiles to return.
    encoder
        Encoder whose tiles to search; the store's only encoder when None (for ``text``, its
        only image encoder: text tables ``<encoder>-text`` are not searched).
    cohort, slides, exclude_slides
        Search only the tiles of this cohort, of these slide ids, and not of those. ``cohort``
        also names the query slide's cohort when a slide id is in several.
    weights
        Where the encoder's weights are (``hf-hub:org/repo``, ``local-dir:/path`` or a file),
        for an image or text query; by default where the store records they were loaded from.
    out
        Parquet file to write the hits to (atomically; only a file embedstore wrote is replaced).
    plot
        PNG to draw the mosaic to: the query tile first (framed), then its hits read from
        their slides, each captioned with slide id and score. A hit whose slide file is gone
        is a grey box.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"`` for encoding a query image or text.

    Returns
    -------
    Arrow table of the hits, best first: rank (1-based), cohort, slide_id, tile_id, spot_id,
    x, y (level-0 centre), score (cosine).
    """
    check("search", k=k, device=device)
    by_tile = slide is not None or tile is not None
    if by_tile + (image is not None) + (text is not None) != 1 or (by_tile and (slide is None or tile is None)):
        msg = "search: give one query: a stored tile (slide and tile, --slide --tile), a picture (image, --image) or gene symbols (text, --text)"
        raise BadInput(msg)
    if out is not None:
        check_hits_out(out)
    if plot is not None:
        check_mosaic_out(plot)
    st = store if isinstance(store, Store) else open_store(store)
    if text is not None:
        encoder = image_encoder(st.encoders(), encoder, st.root)
    name = resolve_encoder(st, encoder)
    meta = st.encoder_metadata(name, cohort, slides)  # of the tiles searched: their fingerprint and geometry
    if by_tile:
        query_cohort = _query_cohort(st, name, slide, cohort)
        vector = tile_vector(st, slide, tile, encoder=name, cohort=query_cohort)
        query: dict[str, Any] = {"cohort": query_cohort, "slide_id": slide, "tile_id": tile}
        picture = _stored_tile(st, name, query_cohort, slide, tile) if plot is not None else None
    elif text is not None:
        vector = text_vector(meta, text, measured_genes(st), st.root, weights=weights, device=_device(device))
        query = {"text": text}
        picture = None
    else:
        picture = read_query_image(image, meta["geometry"])
        vector = encode_query(picture, meta, st.root, image, weights=weights, device=device)
        query = {"image": str(Path(image).resolve())}
    hits = nearest_tiles(st, vector, k, encoder=name, cohort=cohort, slides=slides, exclude_slides=exclude_slides)
    hits = hits.drop_columns(["query"])
    hits = hits.replace_schema_metadata(
        {
            META_SCHEMA_VERSION: SCHEMA_VERSION,
            META_KIND: HITS_KIND,
            META_ENCODER: json.dumps({"name": name, "fingerprint": meta["fingerprint"]}, sort_keys=True),
            META_QUERY: json.dumps(query, sort_keys=True),
        }
    )
    if out is not None:
        _write_hits(hits, Path(out))
    if plot is not None:
        caption = (
            f"query: {slide} {tile}"
            if by_tile
            else f"query: {text}"
            if text is not None
            else f"query: {Path(image).name}"
        )
        draw_mosaic(st, name, picture, caption, hits, Path(plot))
    return hits


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _query_cohort(st: Store, encoder: str, slide: str, cohort: str | None) -> str | None:
    """The cohort of the query slide: ``cohort`` when it holds the slide or is needed to tell, else the only one that does.

    The search's cohort filter does not confine the query: a tile of one cohort may look for its
    likes in another.
    """
    found = {r.cohort for r in list_slides(st.root, encoder) if r.slide_id == slide}
    if cohort in found or len(found) != 1:
        return cohort  # tile_vector names the problem when the slide is missing or ambiguous
    return found.pop()


# ------------------------------------------------------------------------------ query picture


def read_query_image(path: str | Path, geometry: dict[str, Any]) -> np.ndarray:
    """A picture as one tile of the store's geometry: ``(size_px, size_px, 3)`` uint8.

    Transparent pixels are laid on white (what a slide read gives outside the tissue). A picture
    of another size is cropped to its centre square and resized with the store's resampling
    filter; a progress line says so.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    size = int(geometry["size_px"])
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        msg = f"{path}: no such file; pass a PNG, JPEG or TIFF picture of one tile (--image)"
        raise BadInput(msg) from e
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        msg = f"{path}: not a readable image ({str(e).splitlines()[0][:120]}); pass a PNG, JPEG or TIFF picture of one tile"
        raise BadInput(msg) from e
    w, h = rgb.size
    if (w, h) != (size, size):
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        rgb = rgb.resize((size, size), Image.Resampling[str(geometry["resample"]).upper()], box=box)
        cropped = f", centre {side}x{side} px crop" if w != h else ""
        step(
            "query image %s: %dx%d px resized to the store's %dx%d px tile%s, taken as %s µm/px",
            path.name, w, h, size, size, cropped, geometry["mpp"],
        )  # fmt: skip
    return np.asarray(rgb, dtype=np.uint8)


def encode_query(
    picture: np.ndarray,
    meta: dict[str, Any],
    where: str | Path,
    image: str | Path,
    *,
    weights: str | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Embed one tile with the encoder the store's metadata ``meta`` describes; ``(D,)`` float32.

    Raises
    ------
    FingerprintMismatch
        The encoder built here (another embedstore version, other weights) is not the one the
        store was embedded with: its vectors would not be comparable.
    """
    from embedstore.encoders import create_encoder

    chosen = weights if weights is not None else recorded_weights(meta.get("weights"))
    enc = create_encoder(meta["name"], weights=chosen).to(device)
    # a stain-normalised store hashes the setting into its fingerprint; the encoder's own is kept beside it
    own = meta.get("encoder_fingerprint", meta["fingerprint"])
    if enc.fingerprint != own:
        msg = (
            f"{image}: the {enc.name} encoder built here (weights {enc.weights_source}) has fingerprint "
            f"{enc.fingerprint}, but {where} was embedded with {own}; pass the weights it was "
            "embedded with (weights=, --weights) or use the embedstore version that embedded it"
        )
        raise FingerprintMismatch(msg)
    if meta.get("stain_norm"):
        picture = _stain_normalised(picture, meta["stain_norm"], image)
    return enc.encode(picture[None])[0]


def _stain_normalised(picture: np.ndarray, setting: dict[str, Any], image: str | Path) -> np.ndarray:
    """The query picture normalised as the store's tiles were: Macenko to the same target stain.

    The store fitted each slide's stain on its tissue; a lone picture is fitted on itself.
    """
    from embedstore.stain import StainParams, estimate_stains, normalize

    try:
        source = estimate_stains(picture, Io=setting["Io"], alpha=setting["alpha"], beta=setting["beta"])
    except BadInput as e:
        msg = (
            f"{image}: its stain cannot be fitted ({e}); the store's tiles are stain-normalised, so the query must be "
            "too: pass a picture with more stained tissue"
        )
        raise BadInput(msg) from e
    target = setting["target"]
    return normalize(
        picture, source, StainParams(np.asarray(target["matrix"]), np.asarray(target["max_conc"])), Io=setting["Io"]
    )


# ------------------------------------------------------------------------------ outputs


def _parquet_kind(path: Path) -> str | None:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return meta.get(META_KIND.encode(), b"").decode() or None


def check_hits_out(path: str | Path) -> None:
    """Refuse (:class:`BadInput`, nothing touched) a hits path holding a file embedstore did not write."""
    check_replaceable(path, HITS_KIND, what="search hits (.parquet)", reader=_parquet_kind)


def check_mosaic_out(path: str | Path) -> None:
    """Refuse (:class:`BadInput`, nothing touched) a mosaic path holding a file embedstore did not write."""
    check_replaceable(path, MOSAIC_KIND, what="search mosaic (.png)", option="--plot")


def _write_hits(hits: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path, size_hint=int(hits.nbytes)) as tmp:
        pq.write_table(hits, tmp)
    LOG.info("wrote %d hits to %s", hits.num_rows, path)


def _tile_pictures(
    st: Store, encoder: str, cohort: str, slide_id: str, xs: Sequence[int], ys: Sequence[int]
) -> list[np.ndarray] | str:
    """The pixels of tiles of one slide, read from the file it was embedded from, or why they cannot be."""
    from embedstore.tile_table import make_tile_table
    from embedstore.tiling import TileReader

    src = st.slide_source(encoder, cohort, slide_id) or {}
    path = src.get("image") if src.get("kind") == "st" else src.get("data")
    if not path:
        return "the store does not record its slide file"
    if not Path(path).is_file():
        return f"{path} is gone"
    geom = st.encoder_metadata(encoder, cohort, [slide_id])["geometry"]
    n = len(xs)
    table = make_tile_table(
        slide_id,
        np.asarray(xs, np.int64),
        np.asarray(ys, np.int64),
        None,
        geom["mpp"],
        geom["size_px"],
        np.zeros(n, bool),
    )
    reader = TileReader(path, table, mpp=src.get("mpp"))
    try:
        return [reader[i] for i in range(n)]
    except (EmbedstoreError, OSError, ValueError) as e:  # the file is there but no longer a readable slide
        return f"{path} cannot be read: {str(e).splitlines()[0][:120]}"
    finally:
        reader.close()


def _stored_tile(st: Store, encoder: str, cohort: str, slide_id: str, tile_id: str) -> np.ndarray | None:
    """The pixels of a stored tile (None when its slide file cannot be read; a progress line says why)."""
    meta, _ = st.read_embeddings(encoder, cohort=[cohort], slide_ids=[slide_id], columns=[Col.TILE_ID, Col.X, Col.Y])
    row = meta.column(Col.TILE_ID).to_pylist().index(tile_id)  # tile_vector found it: it is there
    found = _tile_pictures(st, encoder, cohort, slide_id, [meta[Col.X][row].as_py()], [meta[Col.Y][row].as_py()])
    if isinstance(found, str):
        step("query tile drawn as a grey box: slide %s missing (%s)", slide_id, found)
        return None
    return found[0]


def mosaic_shape(n_hits: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the mosaic of a query and ``n_hits`` hits."""
    cells = n_hits + 1
    cols = min(cells, MOSAIC_COLUMNS)
    rows = math.ceil(cells / cols)
    return cols * CELL_PX, rows * (CELL_PX + CAPTION_PX)


def draw_mosaic(st: Store, encoder: str, query: np.ndarray | None, caption: str, hits: pa.Table, path: Path) -> Path:
    """Draw the query picture (framed) and its hits read from their slides into a PNG (atomically).

    Hits whose slide file is gone (or unreadable) are grey boxes marked "slide missing"; one
    progress line names those slides. The PNG carries ``embedstore.kind = "search_mosaic"``.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pictures: list[np.ndarray | None] = [None] * hits.num_rows
    missing: dict[str, str] = {}
    cohorts, slide_ids = hits[Col.COHORT].to_pylist(), hits[Col.SLIDE_ID].to_pylist()
    xs, ys = hits[Col.X].to_pylist(), hits[Col.Y].to_pylist()
    for key in dict.fromkeys(zip(cohorts, slide_ids, strict=True)):
        at = [i for i, c_s in enumerate(zip(cohorts, slide_ids, strict=True)) if c_s == key]
        found = _tile_pictures(st, encoder, *key, [xs[i] for i in at], [ys[i] for i in at])
        if isinstance(found, str):
            missing[key[1]] = found
            continue
        for i, pic in zip(at, found, strict=True):
            pictures[i] = pic
    if missing:
        step(
            "%d hit(s) drawn as grey boxes, their slide file missing: %s",
            sum(p is None for p in pictures), "; ".join(f"{s} ({why})" for s, why in missing.items()),
        )  # fmt: skip

    width, height = mosaic_shape(hits.num_rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # its own Agg canvas: no pyplot state, no GUI backend
    cols = width // CELL_PX
    scores, tile_ids = hits["score"].to_pylist(), hits[Col.TILE_ID].to_pylist()
    cells = [(query, caption, True)] + [
        (pictures[i], f"{slide_ids[i][:20]}  {tile_ids[i][:14]}\n{scores[i]:.3f}", False) for i in range(hits.num_rows)
    ]
    side = CELL_PX - 2 * PAD_PX
    for i, (pic, text, framed) in enumerate(cells):
        r, c = divmod(i, cols)
        left, top = c * CELL_PX + PAD_PX, r * (CELL_PX + CAPTION_PX) + PAD_PX  # pixels from the top-left
        ax = fig.add_axes((left / width, 1 - (top + side) / height, side / width, side / height))
        ax.set_xticks([])
        ax.set_yticks([])
        if pic is None:
            ax.imshow(np.full((8, 8, 3), MISSING_GREY, np.uint8))
            ax.text(0.5, 0.5, "slide missing", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        else:
            ax.imshow(pic)
        for spine in ax.spines.values():
            spine.set_visible(framed)
            spine.set_color("crimson")
            spine.set_linewidth(4)
        ax.set_xlabel(text, fontsize=8, labelpad=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={KIND_KEY: MOSAIC_KIND})
    data = buf.getvalue()
    with atomic_file(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    LOG.info("wrote search mosaic %s (%d hits)", path, hits.num_rows)
    return path
