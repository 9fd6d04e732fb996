"""Nearest-tile search over a store: its tile index where there is one, exact scans of the Parquet files otherwise.

The tile index of an encoder (written by :mod:`embedstore.tile_index`) lives in
``STORE/tile_indexes/encoder=<E>/``: ``index.faiss`` (ids, not row numbers; with ``index.ivfdata``
holding its inverted lists when the tiles did not fit in memory), ``tiles.parquet``
(id -> cohort, slide_id, tile_id, spot_id, x, y) and ``manifest.json``, which records each
slide file it covers with its version (size, mtime, inode) and id range.

:func:`nearest_tiles` searches the index for the slides it covers, scans exactly the slides
embedded or changed since it was built (never silently missed; one progress line says so),
and scans everything when there is no index. Filters on cohort and slides are applied inside
the search (a FAISS selector, or an exact scan of the selected slides when they are few),
never by dropping hits afterwards. Searching only reads: FAISS is loaded (memory-mapped,
read-only) when a search needs it, so the store stays cheap to import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._optional import import_optional
from embedstore._progress import step
from embedstore._schema import META_KIND, Col
from embedstore._vectors import ivf_of, l2_normalize
from embedstore.errors import BadInput, DamagedFile
from embedstore.store._files import check_name
from embedstore.store._integrity import inspect_slide_file, repair_hint
from embedstore.store._store import Store, open_store
from embedstore.store._writer import SLIDE_FILE

LOG = logging.getLogger(__name__)

KIND = "tile_index"
FOLDER = "tile_indexes"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # on-disk inverted lists of a large index (embedstore._ondisk)
TILES_FILE = "tiles.parquet"
MANIFEST_FILE = "manifest.json"
HIT_COLUMNS = (Col.COHORT, Col.SLIDE_ID, Col.TILE_ID, Col.SPOT_ID, Col.X, Col.Y)
# Selected slides of fewer tiles than this are scanned exactly instead of searched through an
# IVF selector (which would need most lists probed to find them).
EXACT_BELOW = 50_000
GROWTH_REBUILD = 2.0  # an IVF index trained on n tiles is rebuilt once it holds more than 2n
MAX_K = 10_000


def index_folder(root: Path, encoder: str) -> Path:
    """Where the tile index of ``encoder`` lives in the store at ``root``."""
    return Path(root) / FOLDER / f"encoder={check_name(encoder, 'encoder name')}"


def update_hint(root: Path, encoder: str) -> str:
    return f"embedstore index tiles --store {root} --encoder {encoder}"


@dataclasses.dataclass(frozen=True)
class SlideRef:
    """One published embedding file of the store, and the version the file system gives it."""

    cohort: str
    slide_id: str
    path: Path
    version: tuple[int, int, int]  # size, mtime_ns, inode: any rewrite changes one of them

    @property
    def key(self) -> tuple[str, str]:
        return (self.cohort, self.slide_id)


def list_slides(root: Path, encoder: str) -> list[SlideRef]:
    """The published slide files of ``encoder``, sorted by (cohort, slide_id)."""
    base = Path(root) / "embeddings" / f"encoder={encoder}"
    out = []
    for p in sorted(base.glob(f"cohort=*/slide_id=*/{SLIDE_FILE}")):
        try:
            st = p.stat()
        except FileNotFoundError:  # removed while listing
            continue
        out.append(
            SlideRef(
                p.parent.parent.name.split("=", 1)[1],
                p.parent.name.split("=", 1)[1],
                p,
                (st.st_size, st.st_mtime_ns, st.st_ino),
            )
        )
    return out


def resolve_encoder(store: str | Path | Store, encoder: str | None = None) -> str:
    """``encoder`` checked against the store, or the store's only encoder when None."""
    st = as_store(store)
    names = sorted(p.name.split("=", 1)[1] for p in (st.root / "embeddings").glob("encoder=*") if p.is_dir())
    if encoder is not None:
        if encoder not in names:
            msg = f"encoder {encoder}: no embeddings in {st.root} (stored: {', '.join(names) or 'none'}); embed with it first or pick one of those"
            raise BadInput(msg)
        return encoder
    if len(names) != 1:
        msg = (
            f"{st.root}: holds {len(names)} encoders ({', '.join(names) or 'none'}); name one with --encoder / encoder=..."
            if names
            else f"{st.root}: no embeddings yet; embed slides into the store first"
        )
        raise BadInput(msg)
    return names[0]


def as_store(store: str | Path | Store) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def read_slide(st: Store, ref: SlideRef, fingerprint: str) -> tuple[pa.Table, np.ndarray]:
    """Metadata (HIT_COLUMNS) and L2-normalised vectors of one slide file, checked against ``fingerprint``."""
    meta, vectors = st.read_embeddings(
        _encoder_of(ref), cohort=[ref.cohort], slide_ids=[ref.slide_id], columns=list(HIT_COLUMNS),
        fingerprint=fingerprint,
    )  # fmt: skip
    return meta, l2_normalize(vectors)


def _encoder_of(ref: SlideRef) -> str:
    return ref.path.parent.parent.parent.name.split("=", 1)[1]


def store_fingerprint(root: Path, slides: list[SlideRef]) -> tuple[str, int]:
    """Fingerprint and dim of the encoder's files (the first file's; every read checks the rest)."""
    info = inspect_slide_file(slides[0].path, repair_hint(root))
    return info.fingerprint, int(info.dim)


# ------------------------------------------------------------------------------ building


def read_manifest(folder: Path, encoder: str) -> dict[str, Any] | None:
    """The manifest of a tile index at ``folder``; None if there is none; refuses a folder that is something else."""
    if not folder.exists():
        return None
    manifest = folder / MANIFEST_FILE
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get(META_KIND) != KIND:
        if folder.is_dir() and not any(folder.iterdir()):
            return None
        msg = f"{folder}: not a tile index embedstore wrote (no readable manifest); move it away, then rerun"
        raise BadInput(msg)
    if data.get("encoder", {}).get("name") != encoder:
        msg = f"{folder}: manifest names encoder {data.get('encoder', {}).get('name')!r}, not {encoder!r}; move it away, then rerun"
        raise BadInput(msg)
    return data


def version_now(ref: SlideRef) -> tuple[int, int, int] | None:
    """The version of ``ref``'s file now (None when it is gone)."""
    try:
        st = ref.path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def damaged(folder: Path, name: str, problem: str) -> DamagedFile:
    """A :class:`DamagedFile` for a file of the tile index at ``folder``, advising the rebuild."""
    root = folder.parent.parent
    enc = folder.name.split("=", 1)[1]
    return DamagedFile(folder / name, problem, f"rebuild it: {update_hint(root, enc)} --rebuild")


def read_ondisk_index(index_file: Path, ivfdata_file: Path, writable: bool = False) -> Any:
    """An index written with on-disk inverted lists, its lists mapped from ``ivfdata_file``.

    FAISS records the lists' file by the path it had when built (a temporary folder, since
    renamed): the index is read without its lists and they are mapped from ``ivfdata_file``,
    wherever the folder now is. ``IO_FLAG_MMAP`` must not be used here: it skips mapping on-disk
    lists, and the first search then crashes. Read-only unless ``writable`` (an update, on a copy).
    """
    faiss = import_optional("faiss", "tile search")
    flags = faiss.IO_FLAG_SKIP_IVF_DATA | (0 if writable else faiss.IO_FLAG_READ_ONLY)
    index = faiss.read_index(str(index_file), flags)
    lists = faiss.downcast_InvertedLists(ivf_of(faiss, index).invlists) if ivf_of(faiss, index) is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        msg = f"{index_file}: has no on-disk inverted lists"
        raise RuntimeError(msg)
    if ivfdata_file.stat().st_size < lists.totsize:  # mapping past the end of a file crashes on access
        msg = f"{ivfdata_file}: {ivfdata_file.stat().st_size} bytes, shorter than the {lists.totsize} its index maps"
        raise RuntimeError(msg)
    lists.filename = str(ivfdata_file)
    lists.read_only = not writable
    lists.do_mmap()
    return index


def is_ondisk(manifest: dict[str, Any]) -> bool:
    """Whether a tile index's manifest records on-disk inverted lists (``index.ivfdata``)."""
    return manifest.get("layout", {}).get("invlists") == "ondisk"


def read_index(folder: Path, manifest: dict[str, Any], mmap: bool) -> Any:
    faiss = import_optional("faiss", "tile search")
    path = folder / INDEX_FILE
    files = manifest.get("files", {})
    ondisk = is_ondisk(manifest)
    for name in (INDEX_FILE, IVFDATA_FILE) if ondisk else (INDEX_FILE,):
        want = files.get(name)
        if not (folder / name).is_file() or (want is not None and (folder / name).stat().st_size != want):
            raise damaged(folder, name, "missing or not the size its manifest records")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and not manifest["search"].get("exact") else 0
    try:
        # on-disk lists are mapped from index.ivfdata, read-only
        index = read_ondisk_index(path, folder / IVFDATA_FILE) if ondisk else faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise damaged(folder, INDEX_FILE, f"unreadable ({str(e).strip().splitlines()[-1][:120]})") from e
    if index.ntotal != manifest["n_tiles"] or index.d != manifest["encoder"]["dim"]:
        raise damaged(folder, INDEX_FILE, f"holds {index.ntotal} vectors of dim {index.d}, its manifest says otherwise")
    ivf = ivf_of(faiss, index)
    if ivf is not None and manifest["search"].get("nprobe"):
        ivf.nprobe = int(manifest["search"]["nprobe"])
    return index


def read_tiles(folder: Path, manifest: dict[str, Any]) -> pa.Table:
    path = folder / TILES_FILE
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise damaged(folder, TILES_FILE, f"unreadable ({str(e).splitlines()[0][:120]})") from e
    if table.num_rows != manifest["n_tiles"] or table.column_names != ["id", *HIT_COLUMNS]:
        raise damaged(folder, TILES_FILE, "rows or columns differ from what its manifest records")
    return table


@dataclasses.dataclass
class LoadedIndex:
    """A tile index read for searching: FAISS (memory-mapped where it can be), tile rows sorted by id."""

    manifest: dict[str, Any]
    index: Any
    tiles: pa.Table
    ids: np.ndarray  # tiles' ids, ascending


_CACHE: dict[Path, tuple[tuple[int, int, int], LoadedIndex]] = {}
_CACHE_LOCK = threading.Lock()


def load_tile_index(root: Path, encoder: str) -> LoadedIndex | None:
    """The encoder's tile index (cached per process until its manifest changes), or None when there is none."""
    folder = index_folder(root, encoder)
    manifest_path = folder / MANIFEST_FILE
    try:
        st = manifest_path.stat()
    except FileNotFoundError:
        return None
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    with _CACHE_LOCK:
        hit = _CACHE.get(folder)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        manifest = read_manifest(folder, encoder)
        if manifest is None:
            return None
        tiles = read_tiles(folder, manifest)
        loaded = LoadedIndex(manifest, read_index(folder, manifest, mmap=True), tiles, tiles.column("id").to_numpy())
        _CACHE[folder] = (stamp, loaded)
        return loaded


# ------------------------------------------------------------------------------ searching


def tile_vector(
    store: str | Path | Store, slide_id: str, tile_id: str, *, encoder: str | None = None, cohort: str | None = None
) -> np.ndarray:
    """The stored embedding (D,) float32 of one tile, found by (cohort,) slide_id and tile_id."""
    st = as_store(store)
    enc = resolve_encoder(st, encoder)
    refs = [s for s in list_slides(st.root, enc) if s.slide_id == slide_id and cohort in (None, s.cohort)]
    if not refs:
        msg = (
            f"slide {slide_id}: no {enc} embeddings in {st.root}; check the slide id (SELECT * FROM slides lists them)"
        )
        raise BadInput(msg)
    if len(refs) > 1:
        msg = f"slide {slide_id}: in cohorts {', '.join(r.cohort for r in refs)}; name the cohort too"
        raise BadInput(msg)
    meta, vectors = st.read_embeddings(enc, cohort=[refs[0].cohort], slide_ids=[slide_id], columns=[Col.TILE_ID])
    rows = np.flatnonzero(meta.column(Col.TILE_ID).to_numpy(zero_copy_only=False) == tile_id)
    if not len(rows):
        msg = f"tile {tile_id}: not a tile of slide {slide_id} ({enc}); check the id (tile ids look like {meta.column(Col.TILE_ID)[0]})"
        raise BadInput(msg)
    return vectors[rows[0]]


def nearest_tiles(
    store: str | Path | Store,
    queries: np.ndarray,
    k: int = 10,
    *,
    encoder: str | None = None,
    cohort: str | None = None,
    slides: Sequence[str] | None = None,
    exclude_slides: Sequence[str] | None = None,
) -> pa.Table:
    """The ``k`` tiles of the store most similar (cosine) to each query vector.

    Parameters
    ----------
    store
        Store folder (or :class:`~embedstore.store.Store`).
    queries
        (Q, D) vectors of the encoder's space (a (D,) vector is one query).
    k
        Tiles per query.
    encoder
        The store's only encoder when None.
    cohort, slides, exclude_slides
        Search only the tiles of this cohort, of these slide ids, and not of those.

    Returns
    -------
    Arrow table, ``k`` rows per query (fewer when fewer tiles pass the filters), best first:
    query (row of ``queries``), rank (1-based), cohort, slide_id, tile_id, spot_id, x, y, score.
    Slides the tile index does not cover yet are scanned exactly (one progress line says so),
    and with no tile index every selected tile is.
    """
    st = as_store(store)
    enc = resolve_encoder(st, encoder)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if not isinstance(k, int | np.integer) or not 0 < k <= MAX_K:
        msg = f"k={k}: must be a whole number between 1 and {MAX_K}"
        raise BadInput(msg)
    return Searcher(st, enc).search(q, int(k), cohort, slides, exclude_slides)


class Searcher:
    """kNN over one encoder's tiles: the tile index for the slides it covers, exact scans for the rest."""

    def __init__(self, store: Store, encoder: str) -> None:
        self.store, self.encoder = store, encoder

    def search(
        self,
        q: np.ndarray,
        k: int,
        cohort: str | None = None,
        slides: Sequence[str] | None = None,
        exclude_slides: Sequence[str] | None = None,
    ) -> pa.Table:
        """See :func:`nearest_tiles` (``q`` is (Q, D))."""
        root, enc = self.store.root, self.encoder
        refs = list_slides(root, enc)
        if not refs:
            msg = f"encoder {enc}: no embedded slides in {root}; embed slides first"
            raise BadInput(msg)
        fingerprint, dim = store_fingerprint(root, refs)
        if q.ndim != 2 or q.shape[1] != dim or len(q) == 0:
            msg = f"query: shape {q.shape}, but {enc} tiles are {dim}-d; give (n, {dim}) vectors of the same encoder"
            raise BadInput(msg)
        q = l2_normalize(q)
        keep_slides = None if slides is None else set(slides)
        drop_slides = set(exclude_slides or ())
        wanted = [
            s
            for s in refs
            if cohort in (None, s.cohort)
            and (keep_slides is None or s.slide_id in keep_slides)
            and s.slide_id not in drop_slides
        ]
        loaded = load_tile_index(root, enc)
        covered, exact = self._split(loaded, wanted, refs, fingerprint)
        parts = []
        n_covered = sum(int(e["n"]) for e, _ in covered)
        if covered and (n_covered >= EXACT_BELOW or loaded.manifest["search"].get("exact")):
            parts.append(_from_index(loaded, q, k, [e for e, _ in covered], n_covered))
        else:  # few tiles selected: reading them beats probing most of the lists
            exact = exact + [r for _, r in covered]
        parts.extend(_scan(self.store, ref, q, k, fingerprint) for ref in exact)
        return _merge(parts, k)

    def _split(
        self, loaded: LoadedIndex | None, wanted: list[SlideRef], refs: list[SlideRef], fingerprint: str
    ) -> tuple[list[tuple[dict[str, Any], SlideRef]], list[SlideRef]]:
        """Wanted slides the index covers (entry, file), and those to scan exactly (new or changed since it was built)."""
        if loaded is None:
            return [], wanted
        same_encoder = fingerprint == loaded.manifest["encoder"]["fingerprint"]
        by_key = {(e["cohort"], e["slide_id"], tuple(e["version"])): e for e in loaded.manifest["slides"]}
        entry = {r: by_key.get((r.cohort, r.slide_id, r.version)) if same_encoder else None for r in refs}
        behind = [r for r in refs if entry[r] is None]
        if behind:
            _warn_once(
                f"tile index of {self.encoder} does not cover {len(behind)} slide(s) embedded or changed since it "
                f"was built ({', '.join(r.slide_id for r in behind[:3])}{', ...' if len(behind) > 3 else ''}); "
                f"they are searched exactly: `{update_hint(self.store.root, self.encoder)}` adds them"
            )
        return [(entry[r], r) for r in wanted if entry[r] is not None], [r for r in wanted if entry[r] is None]


def _from_index(loaded: LoadedIndex, q: np.ndarray, k: int, covered: list[dict[str, Any]], n_covered: int) -> tuple:
    """Top-k from the tile index, restricted to the ``covered`` slides' id ranges when they are not all of it."""
    faiss = import_optional("faiss", "tile search")
    index = loaded.index
    params = None
    if n_covered < index.ntotal:
        allowed = np.zeros(int(loaded.manifest["next_id"]), dtype=bool)
        for e in covered:
            allowed[e["base"] : e["base"] + e["n"]] = True
        bitmap = np.packbits(allowed, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        ivf = ivf_of(faiss, index)
        if ivf is not None:
            # a filter keeping a fraction f of the tiles needs about 1/f as many lists probed
            nprobe = min(ivf.nlist, math.ceil(ivf.nprobe * index.ntotal / n_covered))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=sel)
        params.referenced = (bitmap, sel)  # the selector reads the bitmap: keep both alive with the params
    sims, ids = index.search(q, min(k, n_covered), params=params)
    rows = np.minimum(np.searchsorted(loaded.ids, np.maximum(ids, 0)), len(loaded.ids) - 1)
    return sims, np.where(ids >= 0, rows, -1), loaded.tiles


def _scan(st: Store, ref: SlideRef, q: np.ndarray, k: int, fingerprint: str) -> tuple:
    """Exact top-k of ``q`` among the tiles of one slide file."""
    meta, vectors = read_slide(st, ref, fingerprint)
    kk = min(k, len(vectors))
    sims = q @ vectors.T
    if kk < len(vectors):
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    else:
        top = np.broadcast_to(np.arange(kk), (len(q), kk))
    return np.take_along_axis(sims, top, 1), top, meta


def _merge(parts: list[tuple], k: int) -> pa.Table:
    """The best ``k`` of every part's (sims, rows, table) candidates per query, as the hit table."""
    if not parts:
        return hit_schema().empty_table()
    sims = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    part = np.concatenate([np.full(p[1].shape, i) for i, p in enumerate(parts)], axis=1)
    sims = np.where(rows >= 0, sims, -np.inf)
    # best first; ties broken by (part, row) so that the order is reproducible
    order = np.lexsort((rows, part, -sims), axis=1)[:, :k]
    sims, rows, part = (np.take_along_axis(a, order, 1) for a in (sims, rows, part))
    keep = rows >= 0
    qi, rank = np.nonzero(keep)
    sel_part, sel_row = part[keep], rows[keep]
    pieces, positions = [], []
    for i, p in enumerate(parts):
        at = np.flatnonzero(sel_part == i)
        if len(at):
            pieces.append(p[2].select(list(HIT_COLUMNS)).take(pa.array(sel_row[at])).cast(_hit_meta_schema()))
            positions.append(at)
    hits = pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
    return pa.table(
        {
            "query": pa.array(qi.astype(np.int32)),
            "rank": pa.array((rank + 1).astype(np.int32)),
            **{c: hits.column(c) for c in HIT_COLUMNS},
            "score": pa.array(sims[keep].astype(np.float32)),
        },
        schema=hit_schema(),
    )


def _hit_meta_schema() -> pa.Schema:
    return pa.schema(
        [
            (Col.COHORT, pa.string()), (Col.SLIDE_ID, pa.string()), (Col.TILE_ID, pa.string()),
            (Col.SPOT_ID, pa.string()), (Col.X, pa.int64()), (Col.Y, pa.int64()),
        ]
    )  # fmt: skip


def hit_schema() -> pa.Schema:
    """Columns of :func:`nearest_tiles`' result."""
    return pa.schema([("query", pa.int32()), ("rank", pa.int32()), *_hit_meta_schema(), ("score", pa.float32())])


_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """A progress line said once per process (a SQL query calls the search once per chunk)."""
    if line not in _WARNED:
        _WARNED.add(line)
        step("%s", line)
