"""Build and update the tile index of a store: FAISS over every embedded tile of one encoder.

:func:`build_tile_index` writes ``STORE/tile_indexes/encoder=<E>/`` (the layout and the search
are :mod:`embedstore.store._tile_search`), or updates it in place of a rebuild: slides embedded
since are added, slides removed or re-embedded are dropped (and re-added), with ids never
reused. The codec and nprobe are chosen at build time for a target recall on held-out tiles of
the store (:func:`embedstore._knn.build_tuned`) and recorded in the manifest with the recall
reached. Each run publishes the whole folder in one atomic swap, under a lock.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore import _knn
from embedstore._atomic import atomic_folder
from embedstore._knn import default_factory, import_faiss
from embedstore._progress import stage, step
from embedstore._schema import META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION
from embedstore.errors import BadInput
from embedstore.store import Store
from embedstore.store._files import file_lock, lock_holder
from embedstore.store._store import check_writable
from embedstore.store._tile_search import (
    FOLDER,
    INDEX_FILE,
    KIND,
    MANIFEST_FILE,
    TILES_FILE,
    SlideRef,
    as_store,
    hit_schema,
    index_folder,
    list_slides,
    nearest_tiles,
    read_index,
    read_manifest,
    read_slide,
    read_tiles,
    resolve_encoder,
    store_fingerprint,
    tile_vector,
    version_now,
)

__all__ = [
    "TileIndexReport",
    "build_tile_index",
    "hit_schema",
    "index_folder",
    "nearest_tiles",
    "resolve_encoder",
    "tile_vector",
]

GROWTH_REBUILD = 2.0  # an IVF index trained on n tiles is rebuilt once it holds more than 2n


@dataclasses.dataclass
class TileIndexReport:
    """What :func:`build_tile_index` did."""

    path: Path
    encoder: str
    n_tiles: int
    n_slides: int
    added: list[str]
    removed: list[str]
    rebuilt: bool
    search: dict[str, Any]

    def summary(self) -> str:
        """One line: what changed, and the search settings with the recall they reached."""
        s = self.search
        how = "exact" if s.get("exact") else f"nprobe {s.get('nprobe')}, recall@{s.get('k')} {s.get('recall', 0):.3f}"
        what = (
            "built"
            if self.rebuilt
            else (
                f"updated (+{len(self.added)} / -{len(self.removed)} slides)"
                if self.added or self.removed
                else "up to date"
            )
        )
        return f"tile index {what}: {self.n_tiles} tiles of {self.n_slides} slides, {s.get('factory')} ({how})"


def build_tile_index(
    store: str | Path | Store,
    encoder: str | None = None,
    *,
    factory: str = "auto",
    target_recall: float = 0.95,
    k: int = 10,
    rebuild: bool = False,
    device: str = "auto",
    seed: int = 0,
) -> TileIndexReport:
    """Create or update the tile index of one encoder of a store.

    Parameters
    ----------
    store
        Store folder (or :class:`~embedstore.store.Store`).
    encoder
        Encoder whose tiles to index; the store's only encoder when None.
    factory
        FAISS factory string, or ``"auto"``: exact below 100,000 tiles, IVF with compressed
        codes above, codec and nprobe chosen for ``target_recall`` at ``k``.
    target_recall, k
        Recall@k the search settings must reach on held-out tiles of the store.
    rebuild
        Build from scratch even where an update would do.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"`` for building.
    seed
        Seeds sampling and k-means.

    An existing index is updated: slides embedded since are added, removed or re-embedded
    ones dropped (and re-added), without retraining. It is rebuilt when the encoder's
    fingerprint, the factory or the target changed, or the tiles outgrew what the index was
    trained for (an exact index past 100,000 tiles, an IVF index past twice its training size).
    """
    st = as_store(store)
    enc = resolve_encoder(st, encoder)
    if not 0 < target_recall <= 1:
        msg = f"target_recall={target_recall}: must be in (0, 1], e.g. 0.95"
        raise BadInput(msg)
    folder = index_folder(st.root, enc)
    check_writable(folder.parent)
    lock = st.root / "_locks" / FOLDER / f"encoder={enc}.lock"
    with file_lock(lock, blocking=False) as acquired:
        if not acquired:
            msg = f"{folder}: another run is building this tile index ({lock_holder(lock) or 'unknown'}); wait for it to end"
            raise BadInput(msg)
        slides = list_slides(st.root, enc)
        if not slides:
            msg = f"encoder {enc}: no embedded slides in {st.root}; embed slides first"
            raise BadInput(msg)
        fingerprint, dim = store_fingerprint(st.root, slides)
        old = None if rebuild else read_manifest(folder, enc)
        why = _rebuild_reason(old, fingerprint, factory, target_recall, k, slides)
        if why:
            if old is not None:
                step("tile index of %s: rebuilding (%s)", enc, why)
            return _build(st, enc, folder, slides, fingerprint, dim, factory, target_recall, k, device, seed)
        return _update(st, enc, folder, old, slides, fingerprint)


def _rebuild_reason(
    old: dict[str, Any] | None, fingerprint: str, factory: str, target: float, k: int, slides: list[SlideRef]
) -> str:
    if old is None:
        return "new"
    if old["encoder"].get("fingerprint") != fingerprint:
        return "the encoder's fingerprint changed"
    if old.get("requested", {}) != {"factory": factory, "target_recall": target, "k": k}:
        return "other factory or target"
    n = sum(int(e["n"]) for e in old["slides"] if _still(e, slides)) + _new_tiles(old, slides)
    exact_now = factory == "auto" and default_factory(n, 1) == "Flat"
    if factory == "auto" and exact_now != bool(old["search"].get("exact")):
        return f"{n} tiles call for {'an exact' if exact_now else 'an IVF'} index"
    if not old["search"].get("exact") and n > GROWTH_REBUILD * int(old["n_trained"]):
        return f"{n} tiles, more than {GROWTH_REBUILD:g}x the {old['n_trained']} it was trained on"
    return ""


def _still(entry: dict[str, Any], slides: list[SlideRef]) -> bool:
    return any(s.key == (entry["cohort"], entry["slide_id"]) and list(s.version) == entry["version"] for s in slides)


def _new_tiles(old: dict[str, Any], slides: list[SlideRef]) -> int:
    """Tiles of the slides the index does not cover, from their footers (no data read)."""
    covered = {(e["cohort"], e["slide_id"], tuple(e["version"])) for e in old["slides"]}
    return sum(pq.read_metadata(s.path).num_rows for s in slides if (*s.key, s.version) not in covered)


def _read_all(
    st: Store, slides: list[SlideRef], fingerprint: str, base: int
) -> tuple[list[dict], pa.Table, np.ndarray]:
    """Entries (id ranges from ``base``), tile rows and vectors of ``slides``."""
    entries, tables, vectors = [], [], []
    for s in slides:
        meta, vec = read_slide(st, s, fingerprint)
        now = version_now(s)
        if now != s.version:
            msg = f"{s.path}: changed while it was being indexed (re-embedded?); rerun when the embedding run ends"
            raise BadInput(msg)
        ids = pa.array(np.arange(base, base + len(vec), dtype=np.int64))
        tables.append(meta.add_column(0, "id", ids))
        vectors.append(vec)
        entries.append(
            {"cohort": s.cohort, "slide_id": s.slide_id, "version": list(s.version), "base": base, "n": len(vec)}
        )
        base += len(vec)
    table = pa.concat_tables(tables) if tables else None
    return entries, table, (np.concatenate(vectors) if vectors else np.empty((0, 0), np.float32))


def _build(st, enc, folder, slides, fingerprint, dim, factory, target, k, device, seed) -> TileIndexReport:
    with stage("tile index of %s: reading %d slides", enc, len(slides)):
        entries, tiles, vectors = _read_all(st, slides, fingerprint, 0)
    ids = tiles.column("id").to_numpy()
    with stage("tile index of %s: building over %d tiles", enc, len(vectors)):
        index, search = _knn.build_tuned(
            vectors, None if factory == "auto" else factory, ids=ids, k=min(k, len(vectors) - 1) or 1,
            target_recall=target, device=device, seed=seed,
        )  # fmt: skip
    manifest = {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_KIND: KIND,
        "encoder": {"name": enc, "fingerprint": fingerprint, "dim": dim},
        "metric": "ip",
        "requested": {"factory": factory, "target_recall": target, "k": k},
        "search": search,
        "n_tiles": len(vectors),
        "n_trained": len(vectors),
        "next_id": len(vectors),
        "slides": entries,
        "created_at": _now(),
        "updated_at": _now(),
    }
    _publish(folder, index, tiles, manifest)
    return TileIndexReport(folder, enc, len(vectors), len(entries), [e["slide_id"] for e in entries], [], True, search)


def _update(st, enc, folder, old, slides, fingerprint) -> TileIndexReport:
    current = {(s.cohort, s.slide_id, s.version) for s in slides}
    keep = [e for e in old["slides"] if (e["cohort"], e["slide_id"], tuple(e["version"])) in current]
    gone = [e for e in old["slides"] if (e["cohort"], e["slide_id"], tuple(e["version"])) not in current]
    covered = {(e["cohort"], e["slide_id"], tuple(e["version"])) for e in keep}
    new = [s for s in slides if (s.cohort, s.slide_id, s.version) not in covered]
    report = TileIndexReport(folder, enc, int(old["n_tiles"]), len(old["slides"]), [], [], False, old["search"])
    if not gone and not new:
        return report
    faiss = import_faiss("build_tile_index")
    index = read_index(folder, old, mmap=False)
    tiles = read_tiles(folder, old)
    if gone:
        drop = np.zeros(int(old["next_id"]), dtype=bool)
        for e in gone:
            drop[e["base"] : e["base"] + e["n"]] = True
        bitmap = np.packbits(drop, bitorder="little")
        index.remove_ids(faiss.IDSelectorBitmap(len(drop), faiss.swig_ptr(bitmap)))
        tiles = tiles.filter(pa.array(~drop[tiles.column("id").to_numpy()]))
    entries, added, vectors = _read_all(st, new, fingerprint, int(old["next_id"]))
    if new:
        with stage("tile index of %s: adding %d tiles of %d slides", enc, len(vectors), len(new)):
            index.add_with_ids(vectors, added.column("id").to_numpy())
        tiles = pa.concat_tables([tiles, added.cast(tiles.schema)])
    manifest = {
        **old,
        "slides": keep + entries,
        "n_tiles": int(index.ntotal),
        "next_id": int(old["next_id"]) + len(vectors),
        "updated_at": _now(),
    }
    _publish(folder, index, tiles, manifest)
    gone_names = [e["slide_id"] for e in gone]
    return dataclasses.replace(
        report, n_tiles=int(index.ntotal), n_slides=len(manifest["slides"]),
        added=[s.slide_id for s in new], removed=gone_names,
    )  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _publish(folder: Path, index: Any, tiles: pa.Table, manifest: dict[str, Any]) -> None:
    """Write the three files into a fresh folder and swap it in whole."""
    faiss = import_faiss("build_tile_index")
    if "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    with atomic_folder(folder, size_hint=int(tiles.nbytes) + 4 * int(index.ntotal) * int(index.d)) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(tiles, tmp / TILES_FILE)
        manifest["files"] = {name: (tmp / name).stat().st_size for name in (INDEX_FILE, TILES_FILE)}
        # written last: a folder without it is no index
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------ loading
