"""Tissue context of each tile: the mean embedding of its neighbours in µm, from the store.

Methods that carry best to new patients look around the spot (TRIPLEX: the spot, its
neighbours and the whole slide; Hist2ST and STFlow: the graph of spots). The store holds
every tile of a slide with its level-0 centre, so the context is a query over the store,
not a re-encoding. :func:`embed_context` writes, for every slide of an encoder::

    STORE/embeddings/encoder=<encoder>-ctx250-600/cohort=<c>/slide_id=<s>/tiles.parquet

(:func:`context_table`): the source table's rows (same ``tile_id``, ``spot_id``, ``x``, ``y``,
geometry), each vector the tile's own embedding followed by the mean embedding of the tiles
within each radius (:func:`context_features`). Every reader of embeddings serves it unchanged:
:meth:`Store.read_embeddings`, ``load_reference``, ``build_index``, ``predict``, ``embedstore
check`` and the SQL view ``embeddings_<encoder>_ctx250_600``. Slides are written as images are
(a per-slide lock, batches staged durably, one atomic publish), so a killed run resumes and a
rerun skips what is done.

Positions: tile centres are level-0 pixels; :func:`slide_mpp` gives the slide's level-0 µm/px
(recorded at embedding as ``slide_mpp`` in the slide's source, else recovered for stores
embedded before it was), so radii are in µm whatever the scan resolution.

The stored encoder metadata: ``name`` the table name, ``family`` ``"context"``, ``source`` the
source encoder's metadata, ``context``: ``{"radii_um": [...], "source_fingerprint": ...}``; the
fingerprint hashes the source fingerprint with the radii, so context of other radii, or of
other source weights, never mixes with this one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._progress import counter, step
from embedstore._schema import Col, embedding_schema, fingerprint, tile_schema
from embedstore.errors import BadInput, DamagedFile, EmbedstoreError
from embedstore.slide_jobs import SlideJob, SlideReport, SlideResult, results_table, slide_failure

__all__ = [
    "CONTEXT_SUFFIX",
    "DEFAULT_RADII_UM",
    "ContextReport",
    "check_radii",
    "context_features",
    "context_table",
    "embed_context",
    "positions_um",
    "slide_mpp",
]

LOG = logging.getLogger(__name__)

CONTEXT_SUFFIX = "-ctx"
FAMILY = "context"
# 250 µm: a tile's immediate neighbours (the 4 adjacent spots of a legacy-ST spot on its 200 µm
# grid, the two rings of Visium spots around one at 100 µm pitch); 600 µm: the ~1 mm niche around it.
DEFAULT_RADII_UM = (250.0, 600.0)
BLOCK_ROWS = 4096  # tiles whose context is computed (and staged) at once: bounds memory on any slide


def check_radii(radii_um: Sequence[float] | float) -> tuple[float, ...]:
    """``radii_um`` as a tuple of floats; :class:`BadInput` unless non-empty, finite, positive and increasing."""
    values = [radii_um] if isinstance(radii_um, int | float) else radii_um
    try:
        radii = tuple(float(r) for r in values)
    except (TypeError, ValueError):
        radii = ()
        bad = True
    else:
        bad = not radii or any(not math.isfinite(r) or r <= 0 for r in radii)
        bad = bad or any(b <= a for a, b in itertools.pairwise(radii))
    if bad:
        msg = (
            f"radii_um={radii_um!r} (--radius): need one or more positive radii in µm, in increasing order, "
            "e.g. --radius 250 --radius 600"
        )
        raise BadInput(msg)
    return radii


def context_table(encoder: str, radii_um: Sequence[float] = DEFAULT_RADII_UM) -> str:
    """Name of the table holding ``encoder``'s context at ``radii_um``: ``"<encoder>-ctx250-600"``.

    Context of other radii goes to another table (so does not refuse or mix with this one); its
    SQL view is ``embeddings_<encoder>_ctx250_600``. Radii print with 6 significant digits:
    radii closer than that share the name and are told apart (and refused) by the fingerprint.
    """
    return f"{encoder}{CONTEXT_SUFFIX}" + "-".join(f"{r:g}" for r in check_radii(radii_um))


def _block_means(
    tree: Any, xy_um: np.ndarray, emb: np.ndarray, radii: tuple[float, ...], rows: np.ndarray
) -> np.ndarray:
    """``(len(rows), D * (1 + len(radii)))`` float32: own embedding, then the mean within each radius.

    One sparse row-normalised neighbour matrix per radius times ``emb``: memory grows with the
    rows and their neighbours, never with N x N. Columns are sorted in each row, so a row's
    features do not depend on which rows share its block (a resumed run equals an uninterrupted one).
    """
    from scipy import sparse
    from scipy.spatial import cKDTree

    n, d = emb.shape
    out = np.empty((len(rows), d * (1 + len(radii))), dtype=np.float32)
    out[:, :d] = emb[rows]
    if not len(rows):
        return out
    pairs = cKDTree(xy_um[rows]).sparse_distance_matrix(tree, radii[-1], output_type="ndarray")
    for k, r in enumerate(radii, start=1):
        near = pairs[pairs["v"] <= r]
        i, j = near["i"].astype(np.int64), near["j"].astype(np.int64)
        counts = np.bincount(i, minlength=len(rows))  # >= 1: each tile is its own neighbour
        weights = (1.0 / counts[i]).astype(np.float32)
        adj = sparse.csr_matrix((weights, (i, j)), shape=(len(rows), n), dtype=np.float32)
        adj.sum_duplicates()
        adj.sort_indices()
        out[:, k * d : (k + 1) * d] = adj @ emb
    return out


def context_features(xy_um: np.ndarray, emb: np.ndarray, radii_um: Sequence[float] = DEFAULT_RADII_UM) -> np.ndarray:
    """Each tile's embedding followed by the mean embedding of the tiles around it, per radius.

    Parameters
    ----------
    xy_um
        ``(N, 2)`` tile centres in µm (:func:`positions_um`), one slide (or section).
    emb
        ``(N, D)`` embeddings, row-aligned with ``xy_um``.
    radii_um
        Increasing radii in µm. The defaults, 250 µm and 600 µm: the immediate neighbours of a
        tile (the 4 adjacent spots of a legacy-ST spot on its 200 µm grid, whose diagonals at
        283 µm are not; the two rings of Visium spots around one at 100 µm pitch; about 5 tiles
        across of 112 µm tiles), and the ~1 mm niche around it (TRIPLEX's neighbour and global
        views, at the scale of tissue compartments: a legacy-ST spot's 28 nearest, Visium's ~130).

    Returns
    -------
    ``(N, D * (1 + len(radii_um)))`` float32: ``[own | mean within r1 | mean within r2 | ...]``.
    A tile counts itself among its neighbours (distance 0 is within every radius), so a tile
    with no other tile within a radius gets its own embedding in that block. Neighbours are
    found with a KD-tree and averaged as a sparse-matrix product, block by block: a 200,000-tile
    slide never forms an N x N matrix.
    """
    from scipy.spatial import cKDTree

    radii = check_radii(radii_um)
    xy = np.asarray(xy_um, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float32)
    if xy.ndim != 2 or xy.shape[1] != 2 or emb.ndim != 2 or len(xy) != len(emb):
        msg = f"context_features: xy_um has shape {xy.shape}, emb {emb.shape}; pass (N, 2) µm centres and (N, D) embeddings"
        raise BadInput(msg)
    if not np.isfinite(xy).all():
        msg = "context_features: xy_um holds NaN or inf; pass finite tile centres in µm"
        raise BadInput(msg)
    out = np.empty((len(emb), emb.shape[1] * (1 + len(radii))), dtype=np.float32)
    if not len(emb):
        return out
    tree = cKDTree(xy)
    for start in range(0, len(emb), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(emb)))
        out[rows] = _block_means(tree, xy, emb, radii, rows)
    return out


# --- positions in µm -------------------------------------------------------------------


def _open(store: Any, read_only: bool = True) -> Any:
    from embedstore.store import Store, open_store

    if isinstance(store, Store) and (read_only or not store.read_only):
        return store
    return open_store(store.root if isinstance(store, Store) else store, read_only=read_only)


def _image_of(source: dict[str, Any]) -> str | None:
    """The H&E file a slide was tiled from, as its recorded source names it."""
    return source.get("image") if source.get("kind") == "st" else source.get("data")


def slide_mpp(store: Any, encoder: str, cohort: str, slide_id: str, mpp: float | None = None) -> float:
    """The level-0 µm/px of a stored slide (what its level-0 pixel centres are in).

    In order: the ``slide_mpp`` recorded when it was embedded; the µm/px it was embedded with
    (``mpp``, a ``--mpp`` override or the ST data set's); the slide file it was embedded from,
    opened; ``mpp`` given here (for a store whose sources are gone). A derived table (gene
    sentences) asks the image table it was made from. Nothing is cached: callers that ask often
    keep the answer.

    Raises
    ------
    BadInput
        One line naming the slide and the fix (re-embed it, or pass ``mpp``) when none is known.
    """
    from embedstore import slides

    st = _open(store)
    src = st.slide_source(encoder, cohort, slide_id) or {}
    if src.get("kind") == "text" and src.get("encoder") and src["encoder"] != encoder:
        src = st.slide_source(src["encoder"], cohort, slide_id) or src  # the image tiles the spots pair with
    for key in ("slide_mpp", "mpp"):
        if src.get(key) is not None and slides.plausible_mpp(float(src[key])):
            return float(src[key])
    image = _image_of(src)
    why = "its store does not record where it was embedded from"
    if image and Path(image).is_file():
        try:
            with slides.open_slide(image, slide_id=slide_id) as slide:
                return float(slide.mpp)
        except (EmbedstoreError, OSError, ValueError) as e:
            why = f"{image} gives none ({str(e).splitlines()[0][:120]})"
    elif image:
        why = f"its source {image} is gone"
    if mpp is not None:
        return slides.check_mpp(mpp, "mpp (--mpp)")
    msg = (
        f"slide {slide_id} of cohort {cohort} ({encoder}): its level-0 µm/px is not recorded and {why}; "
        f"re-embed it (embedstore embed SOURCE --store {st.root} --cohort {cohort}), or pass mpp=... (--mpp)"
    )
    raise BadInput(msg)


def _tile_columns() -> list[str]:
    return [n for n in embedding_schema(1).names if n != Col.EMBEDDING]


def positions_um(
    store: Any, encoder: str, cohort: str, slide_id: str, mpp: float | None = None
) -> tuple[pa.Table, np.ndarray]:
    """A stored slide's tiles (metadata table, in table order) and their centres in µm, ``(N, 2)`` float64.

    ``mpp``: the slide's level-0 µm/px when the store cannot tell (see :func:`slide_mpp`).
    """
    from embedstore.store._integrity import read_all, repair_hint
    from embedstore.store._writer import SLIDE_FILE, slide_dir

    st = _open(store)
    info = st.published_slide(encoder, cohort, slide_id)
    if info is None:
        msg = f"slide {slide_id} of cohort {cohort}: no {encoder} embeddings in {st.root}; embed it first"
        raise BadInput(msg)
    path = st.root / "embeddings" / slide_dir(encoder, cohort, slide_id) / SLIDE_FILE
    meta = read_all(path, repair_hint(st.root), _tile_columns())
    return meta, _xy(meta, slide_mpp(st, encoder, cohort, slide_id, mpp))


def _xy(meta: pa.Table, mpp: float) -> np.ndarray:
    x = meta.column(Col.X).to_numpy().astype(np.float64)
    y = meta.column(Col.Y).to_numpy().astype(np.float64)
    return np.column_stack([x, y]) * mpp


# --- the derived table -------------------------------------------------------------------


@dataclasses.dataclass
class ContextReport(SlideReport):
    """Per-slide outcome of :func:`embed_context` (``ok``, ``summary()``), and where the table is."""

    store: Path
    encoder: str  # the source table
    table: str  # the context table
    radii_um: tuple[float, ...]
    results: list[SlideResult]

    def summary(self) -> str:
        """A plain-text table, one line per slide."""
        return results_table(self.results)


def _context_fingerprint(source_fingerprint: str, radii: tuple[float, ...]) -> str:
    return fingerprint(source_fingerprint, {"context": {"radii_um": list(radii)}})


def _context_meta(table: str, source_meta: dict[str, Any], radii: tuple[float, ...], dim: int) -> dict[str, Any]:
    src_fp = str(source_meta["fingerprint"])
    return {
        "name": table,
        "family": FAMILY,
        "fingerprint": _context_fingerprint(src_fp, radii),
        "dim": int(dim) * (1 + len(radii)),
        "weights": source_meta.get("weights"),
        "source": {k: v for k, v in source_meta.items() if k != "geometry"},
        "context": {"radii_um": list(radii), "source_fingerprint": src_fp},
    }


def _selected(st: Any, encoder: str, cohort: Any, slide_ids: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(cohort, slide_id)`` of the selected slides with a published ``encoder`` file (one line when none)."""
    from embedstore.store._files import check_name
    from embedstore.store._writer import SLIDE_FILE

    base = st.root / "embeddings" / f"encoder={check_name(encoder, 'encoder name')}"
    if not base.is_dir() or not any(base.glob(f"cohort=*/slide_id=*/{SLIDE_FILE}")):
        listed = sorted(p.name.split("=", 1)[1] for p in (st.root / "embeddings").glob("encoder=*"))
        msg = f"encoder {encoder}: no embeddings in {st.root}; embed with it first (stored: {', '.join(listed) or 'none'})"
        raise BadInput(msg)
    cohorts = [cohort] if isinstance(cohort, str) else None if cohort is None else list(cohort)
    found = [
        (p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1])
        for p in sorted(base.glob(f"cohort=*/slide_id=*/{SLIDE_FILE}"))
    ]
    found = [(c, s) for c, s in found if cohorts is None or c in cohorts]
    if slide_ids is not None:
        wanted = [slide_ids] if isinstance(slide_ids, str) else list(slide_ids)
        missing = [s for s in wanted if s not in {s for _, s in found}]
        if missing:
            msg = f"slides {', '.join(missing[:5])}: no {encoder} embeddings in {st.root}; embed them or check the ids"
            raise BadInput(msg)
        found = [(c, s) for c, s in found if s in set(wanted)]
    if not found:
        msg = f"encoder {encoder}, cohort {cohort}: no embeddings in {st.root}; check the cohort name"
        raise BadInput(msg)
    return found


def _other_radii(info: Any, expected: str, radii: tuple[float, ...], encoder: str, root: Path) -> BadInput:
    was = (info.encoder.get("context") or {}).get("radii_um")
    msg = (
        f"{info.path}: holds context of fingerprint {info.fingerprint} (radii {was} µm, source "
        f"{(info.encoder.get('context') or {}).get('source_fingerprint')}), this run's is {expected} (radii "
        f"{list(radii)} µm of {encoder}); rerun with those radii, or remove {info.path.parents[2]} to compute it anew"
    )
    return BadInput(msg)


def embed_context(
    store: str | Path | Any,
    encoder: str,
    cohort: str | Sequence[str] | None = None,
    slide_ids: Sequence[str] | None = None,
    *,
    radii_um: Sequence[float] = DEFAULT_RADII_UM,
    mpp: float | None = None,
    progress: bool = True,
) -> ContextReport:
    """Write the context embeddings (:func:`context_features`) of ``encoder``'s slides as a table.

    Each published slide of ``encoder`` (image tiles, or the spot tiles of ST sections: the
    context of a spot is the other spots of its section) gets one slide of table
    :func:`context_table`, with the same rows. Slides already complete with the same
    fingerprint are skipped; slides a killed run left partial resume from their staged blocks.

    Parameters
    ----------
    store
        Store folder (or open :class:`~embedstore.store.Store`).
    encoder
        The stored table to add context to.
    cohort, slide_ids
        Slides to do; all of ``encoder``'s by default.
    radii_um
        Increasing radii in µm (see :func:`context_features`).
    mpp
        Level-0 µm/px for slides whose store records none and whose source is gone.
    progress
        A line per slide, and a bar on a terminal.

    Raises
    ------
    BadInput
        One line, with nothing written: ``encoder`` not in the store, bad radii, a slide whose
        µm/px is unknown, or slides already holding context of other settings under this name.
    """
    radii = check_radii(radii_um)
    st = _open(store)  # read-only first: a wrong path or name creates nothing
    selected = _selected(st, encoder, cohort, slide_ids)
    table = context_table(encoder, radii)
    plan = []
    for c, s in selected:  # everything checked before anything is written
        info = st.published_slide(encoder, c, s)
        expected = _context_fingerprint(info.fingerprint, radii)
        try:
            done = st.published_slide(table, c, s)
        except DamagedFile:
            done = None  # moved aside and computed again below
        if done is not None and done.fingerprint != expected:
            raise _other_radii(done, expected, radii, encoder, st.root)
        plan.append((c, s, info, slide_mpp(st, encoder, c, s, mpp)))
    st = _open(st, read_only=False)
    st.check_writable()
    LOG.info("context of %d slide(s) of %s at %s µm into %s", len(plan), encoder, list(radii), table)
    results = []
    for c, s, info, mpp_s in plan:
        start = time.perf_counter()
        with st.lock_slide(table, c, s):
            try:
                result = _context_slide(st, encoder, table, c, s, info, radii, mpp_s, progress)
            except Exception as e:  # noqa: BLE001  (one broken slide must not stop the others; the summary names it)
                folder = st.root / "embeddings" / f"encoder={table}" / f"cohort={c}" / f"slide_id={s}"
                result = slide_failure(SlideJob(s, folder), e, time.perf_counter() - start, st.root)
        results.append(result)
    return ContextReport(st.root, encoder, table, radii, results)


def _context_slide(
    st: Any,
    encoder: str,
    table: str,
    cohort: str,
    slide_id: str,
    info: Any,
    radii: tuple[float, ...],
    mpp: float,
    progress: bool,
) -> SlideResult:
    """Compute and stage the context of the slide's tiles not staged yet, and publish it (hold its lock)."""
    from scipy.spatial import cKDTree

    start = time.perf_counter()
    expected = _context_fingerprint(info.fingerprint, radii)
    try:
        done = st.published_slide(table, cohort, slide_id)
    except DamagedFile as e:
        LOG.warning("%s: %s; moved it to %s and computing it again", e.path, e.problem, st.quarantine(e.path))
        done = None
    if done is not None:
        if done.fingerprint != expected:  # published meanwhile by a run of other settings
            raise _other_radii(done, expected, radii, encoder, st.root)
        st.clear_stale_staging(table, cohort, slide_id)
        return SlideResult(slide_id, "skipped", 0, 0.0, "already in the store")
    meta_rows, emb = st.read_embeddings(encoder, cohort=[cohort], slide_ids=[slide_id], fingerprint=info.fingerprint)
    xy = _xy(meta_rows, mpp)
    meta = _context_meta(table, info.encoder, radii, emb.shape[1])
    src = st.slide_source(encoder, cohort, slide_id) or {}
    source = {
        "kind": "context",
        # the H&E the tiles come from, so predictions and tile pictures find it as for the source table
        "data": _image_of(src) or str(st.root),
        "store": str(st.root),
        "cohort": cohort,
        "slide_id": slide_id,
        "encoder": encoder,
        "table": table,
        "radii_um": list(radii),
        "mpp": mpp,
        "slide_mpp": mpp,
        "spot_diameter_um": src.get("spot_diameter_um"),
    }
    ids = meta_rows.column(Col.TILE_ID).to_pylist()
    writer = st.slide_writer(meta, cohort, slide_id, info.geometry, len(ids), source)
    staged = writer.done_tile_ids()
    todo = np.array([i for i, t in enumerate(ids) if t not in staged], dtype=np.int64)
    if len(staged):
        LOG.info("%s: resuming, %d of %d tiles already staged", slide_id, len(ids) - len(todo), len(ids))
    tiles = meta_rows.select(tile_schema().names)
    tree = cKDTree(xy)
    bar = counter(len(todo) if progress else 0, slide_id, unit="tile")
    for b in range(0, len(todo), BLOCK_ROWS):
        rows = todo[b : b + BLOCK_ROWS]
        writer.append(tiles.take(pa.array(rows)), _block_means(tree, xy, emb, radii, rows))
        bar(len(rows))
    bar(0, close=True)
    writer.commit(tile_ids=ids)
    seconds = time.perf_counter() - start
    if progress:
        step("%s: context of %d tiles at %s µm (%.1f s)", slide_id, len(ids), list(radii), seconds)
    return SlideResult(slide_id, "done", len(ids), seconds)
