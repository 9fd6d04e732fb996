"""Build and update the tile index of a store: FAISS over every embedded tile of one encoder.

:func:`build_tile_index` writes ``STORE/tile_indexes/encoder=<E>/`` (the layout and the search
are :mod:`embedstore.store._tile_search`), or updates it in place of a rebuild: slides embedded
since are added, slides removed or re-embedded are dropped (and re-added), with ids never
reused. The codec and nprobe are chosen at build time for a target recall on held-out tiles of
the store (:func:`embedstore._knn.build_tuned`) and recorded in the manifest with the recall
reached. Each run publishes the whole folder in one atomic swap, under a lock.

When the store's vectors do not fit in the memory budget, the index is built out of core
(:mod:`embedstore._ondisk`): trained on a sample, filled shard by shard from the slide files
read row group by row group (:func:`build_tile_shard`, one plain function per shard: here one
after the other, or on a Ray cluster one task per shard), its inverted lists merged by FAISS
into ``index.ivfdata`` beside ``index.faiss`` and memory-mapped by searches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore import _knn, _ondisk, _ray
from embedstore._atomic import atomic_folder
from embedstore._knn import default_factory, import_faiss
from embedstore._progress import counter, stage, step
from embedstore._schema import META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION
from embedstore._vectors import l2_normalize
from embedstore.errors import BadInput, EmbedstoreError
from embedstore.store import Store, open_store
from embedstore.store._files import file_lock, lock_holder
from embedstore.store._store import check_writable
from embedstore.store._tile_search import (
    FOLDER,
    HIT_COLUMNS,
    INDEX_FILE,
    IVFDATA_FILE,
    KIND,
    MANIFEST_FILE,
    TILES_FILE,
    SlideRef,
    as_store,
    hit_schema,
    index_folder,
    is_ondisk,
    list_slides,
    nearest_tiles,
    read_index,
    read_manifest,
    read_ondisk_index,
    read_slide,
    read_tiles,
    resolve_encoder,
    store_fingerprint,
    tile_vector,
    version_now,
)

__all__ = [
    "TileIndexReport",
    "TileShard",
    "build_tile_index",
    "build_tile_shard",
    "hit_schema",
    "index_folder",
    "nearest_tiles",
    "resolve_encoder",
    "tile_vector",
]

GROWTH_REBUILD = 2.0  # an IVF index trained on n tiles is rebuilt once it holds more than 2n
ENGINES = ("local", "ray")
RAY_PURPOSE = "index tiles --engine ray"
SHARD_RETRIES = 3  # times Ray runs a shard again whose worker or node died


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
        where = ", inverted lists on disk" if s.get("layout", {}).get("invlists") == "ondisk" else ""
        return f"tile index {what}: {self.n_tiles} tiles of {self.n_slides} slides, {s.get('factory')} ({how}){where}"


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
    layout: str = "auto",
    memory_budget: int | str | None = None,
    engine: str = "local",
    address: str | None = None,
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
    layout
        ``"auto"``: inverted lists on disk when the tiles' vectors do not fit in
        ``memory_budget`` (:func:`embedstore._ondisk.choose_layout`), else in memory;
        ``"memory"`` or ``"ondisk"`` to force one. On disk, the index is IVF (``"auto"``:
        ``IVF{nlist},SQ8``), trained on a sample and filled shard by shard from the slide
        files, its lists in ``index.ivfdata``, memory-mapped by searches.
    memory_budget
        Bytes (or text such as ``"8GB"``) the build may hold; None: half the available memory.
        It also bounds the training sample and the shards of an on-disk build.
    engine
        Where the shards of an on-disk build are filled: ``"local"``, one after the other in
        this process, or ``"ray"``, one Ray task per shard (one CPU each, run again if its
        worker dies); either way they are merged here by FAISS into the same index. The store
        must be at the same path on every node. In-memory builds and updates run here.
    address
        Ray cluster (``host:port`` of the head node) for ``engine="ray"``; default
        ``RAY_ADDRESS``, else Ray started on this machine.

    An existing index is updated: slides embedded since are added, removed or re-embedded
    ones dropped (and re-added), without retraining. It is rebuilt when the encoder's
    fingerprint, the factory or the target changed, or the tiles outgrew what the index was
    trained for (an exact index past 100,000 tiles, an IVF index past twice its training size),
    or the tiles call for the other layout.
    """
    st = as_store(store)
    enc = resolve_encoder(st, encoder)
    if not 0 < target_recall <= 1:
        msg = f"target_recall={target_recall}: must be in (0, 1], e.g. 0.95"
        raise BadInput(msg)
    if engine not in ENGINES:
        msg = f"engine {engine!r}: not an engine; use local or ray"
        raise BadInput(msg)
    if engine == "ray":  # a missing extra or an unreachable cluster fails before anything is written
        _ray.preflight(address, RAY_PURPOSE)
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
        n = sum(_rows(s) for s in slides)
        budget = _ondisk.parse_memory_budget(memory_budget, "memory_budget (--memory-budget)")
        where = _ondisk.choose_layout(n, dim, layout, budget)
        why = _rebuild_reason(old, fingerprint, factory, target_recall, k, slides, where)
        if why:
            if old is not None:
                step("tile index of %s: rebuilding (%s)", enc, why)
            if where == "ondisk":
                return _build_ondisk(
                    st, enc, folder, slides, fingerprint, dim, factory, target_recall, k, seed, budget, engine, address
                )
            _here(engine, "an in-memory build")
            return _build(st, enc, folder, slides, fingerprint, dim, factory, target_recall, k, device, seed)
        _here(engine, "an update")
        return _update(st, enc, folder, old, slides, fingerprint)


def _here(engine: str, what: str) -> None:
    if engine != "local":
        step("tile index: %s runs in this process (the %s engine fills the shards of on-disk builds)", what, engine)


def _rows(ref: SlideRef) -> int:
    """Tiles of a slide file, from its footer."""
    return int(pq.read_metadata(ref.path).num_rows)


def _rebuild_reason(
    old: dict[str, Any] | None,
    fingerprint: str,
    factory: str,
    target: float,
    k: int,
    slides: list[SlideRef],
    layout: str,
) -> str:
    if old is None:
        return "new"
    if old["encoder"].get("fingerprint") != fingerprint:
        return "the encoder's fingerprint changed"
    if old.get("requested", {}) != {"factory": factory, "target_recall": target, "k": k}:
        return "other factory or target"
    n = sum(int(e["n"]) for e in old["slides"] if _still(e, slides)) + _new_tiles(old, slides)
    if layout != ("ondisk" if is_ondisk(old) else "memory"):
        return f"{n} tiles call for inverted lists {'on disk' if layout == 'ondisk' else 'in memory'}"
    exact_now = layout == "memory" and factory == "auto" and default_factory(n, 1) == "Flat"
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
    return sum(_rows(s) for s in slides if (*s.key, s.version) not in covered)


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


def _manifest(enc, fingerprint, dim, factory, target, k, search, entries, n_trained, layout) -> dict[str, Any]:
    n = sum(int(e["n"]) for e in entries)
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_KIND: KIND,
        "encoder": {"name": enc, "fingerprint": fingerprint, "dim": dim},
        "metric": "ip",
        "requested": {"factory": factory, "target_recall": target, "k": k},
        "search": search,
        "layout": layout,
        "n_tiles": n,
        "n_trained": n_trained,
        "next_id": n,
        "slides": entries,
        "created_at": _now(),
        "updated_at": _now(),
    }


def _build(st, enc, folder, slides, fingerprint, dim, factory, target, k, device, seed) -> TileIndexReport:
    with stage("tile index of %s: reading %d slides", enc, len(slides)):
        entries, tiles, vectors = _read_all(st, slides, fingerprint, 0)
    ids = tiles.column("id").to_numpy()
    with stage("tile index of %s: building over %d tiles", enc, len(vectors)):
        index, search = _knn.build_tuned(
            vectors, None if factory == "auto" else factory, ids=ids, k=min(k, len(vectors) - 1) or 1,
            target_recall=target, device=device, seed=seed,
        )  # fmt: skip
    manifest = _manifest(
        enc, fingerprint, dim, factory, target, k, search, entries, len(vectors), {"invlists": "memory"}
    )
    with atomic_folder(folder, size_hint=int(tiles.nbytes) + 4 * len(vectors) * dim) as tmp:
        _write(tmp, index, tiles, manifest)
    return TileIndexReport(folder, enc, len(vectors), len(entries), [e["slide_id"] for e in entries], [], True, search)


# ------------------------------------------------------------------------------ out of core


@dataclasses.dataclass(frozen=True)
class TileShard:
    """The slides one shard of an on-disk tile index holds: plain data, so that a cluster task can build it."""

    root: str  # the store
    encoder: str
    fingerprint: str  # every slide file must carry it
    slides: tuple[SlideRef, ...]
    bases: tuple[int, ...]  # id of each slide's first tile
    sizes: tuple[int, ...]  # tiles of each slide, as its footer said when the build started


def build_tile_shard(
    shard: TileShard, trained_file: str | Path, out_file: str | Path, held: _ondisk.HeldOut | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fill one shard of an on-disk tile index from its slide files, read row group by row group.

    Writes the shard index to ``out_file`` (:func:`embedstore._ondisk.fill_shard`) and its tiles'
    rows (id, cohort, slide_id, tile_id, spot_id, x, y) to ``out_file`` with suffix
    ``.tiles.parquet``. Holds one row group of vectors and the shard's codes at a time.

    Parameters
    ----------
    shard
        The slides, their first ids and sizes.
    trained_file
        The trained empty index shared by all shards.
    out_file
        Where the shard index goes.
    held
        Held-out queries whose exact top-k among the shard's tiles is returned.

    Returns
    -------
    The held-out queries' exact top-k (similarities, ids) among the shard's tiles, or None.
    """
    st = open_store(shard.root)
    tiles_file = Path(out_file).with_suffix(".tiles.parquet")
    writer: pq.ParquetWriter | None = None

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal writer
        for ref, base, size in zip(shard.slides, shard.bases, shard.sizes, strict=True):
            at = base
            for meta, vectors in st.iter_embeddings(
                shard.encoder, cohort=[ref.cohort], slide_ids=[ref.slide_id], columns=list(HIT_COLUMNS),
                fingerprint=shard.fingerprint,
            ):  # fmt: skip
                ids = np.arange(at, at + len(vectors), dtype=np.int64)
                at += len(vectors)
                table = meta.add_column(0, "id", pa.array(ids))
                writer = writer or pq.ParquetWriter(tiles_file, table.schema)
                writer.write_table(table.cast(writer.schema))
                yield ids, l2_normalize(vectors)
            if version_now(ref) != ref.version or at - base != size:
                msg = (
                    f"{ref.path}: changed while it was being indexed (re-embedded?); rerun when the embedding run ends"
                )
                raise BadInput(msg)

    try:
        return _ondisk.fill_shard(trained_file, batches(), out_file, held)
    finally:
        if writer is not None:
            writer.close()


def _sample(st: Store, enc: str, slides: list[SlideRef], sizes: list[int], fingerprint: str, dim: int, n_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``n_sample`` L2-normalised tile vectors drawn uniformly from all slides, and their ids (one read pass)."""
    total = sum(sizes)
    picked = np.sort(np.random.default_rng(seed).choice(total, n_sample, replace=False))
    out = np.empty((n_sample, dim), dtype=np.float32)
    filled, base = 0, 0
    bar = counter(total, "sampling tiles", "tile")
    for ref, size in zip(slides, sizes, strict=True):
        lo, hi = np.searchsorted(picked, [base, base + size])
        at = base
        if hi > lo:
            for _, vectors in st.iter_embeddings(enc, cohort=[ref.cohort], slide_ids=[ref.slide_id], columns=[],
                                                  fingerprint=fingerprint):  # fmt: skip
                rows = picked[lo:hi]
                rows = rows[(rows >= at) & (rows < at + len(vectors))] - at
                out[filled : filled + len(rows)] = l2_normalize(vectors[rows])
                filled += len(rows)
                at += len(vectors)
        bar(size)
        base += size
    bar(0, close=True)
    if filled != n_sample:
        msg = f"{st.root}: slides changed while the tile index was sampling them; rerun when the embedding run ends"
        raise BadInput(msg)
    return out, picked


def _build_ondisk(
    st, enc, folder, slides, fingerprint, dim, factory, target, k, seed, budget, engine, address
) -> TileIndexReport:
    """The tile index built out of core: sample, shards of whole slides (filled by ``engine``), lists merged on disk."""
    sizes = [_rows(s) for s in slides]
    n = sum(sizes)
    nlist, code_size = _ondisk.ivf_shape(_ondisk.ondisk_factory(None if factory == "auto" else factory, n, dim), dim)
    n_sample = _ondisk.sample_size(n, dim, nlist, budget)
    bases = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    shards = _shards(st, enc, fingerprint, slides, bases, sizes, _ondisk.shard_rows(budget, code_size))
    entries = [
        {"cohort": s.cohort, "slide_id": s.slide_id, "version": list(s.version), "base": b, "n": m}
        for s, b, m in zip(slides, bases, sizes, strict=True)
    ]
    size_hint = n * (code_size + 8) + 100 * n
    with atomic_folder(folder, size_hint=size_hint) as tmp, _shard_filler(engine, address, st, tmp, shards) as fill:
        with stage("tile index of %s: sampling %d of %d tiles for training", enc, n_sample, n):
            sample, sample_ids = _sample(st, enc, slides, sizes, fingerprint, dim, n_sample, seed)
        with stage("tile index of %s: building over %d tiles in %d shards, lists on disk", enc, n, len(shards)):
            index, search = _ondisk.build_ondisk(
                sample, sample_ids, len(shards), fill, tmp, None if factory == "auto" else factory, n_total=n,
                k=min(k, n - 1) or 1, target_recall=target, seed=seed,
            )  # fmt: skip
            del sample
            work = tmp / _ondisk.SHARDS_DIR
            _concat_tiles([work / f"shard-{i:05d}.tiles.parquet" for i in range(len(shards))], tmp)
            work.rmdir()
        layout = search.pop("layout")
        manifest = _manifest(enc, fingerprint, dim, factory, target, k, search, entries, n, layout)
        _write(tmp, index, None, manifest)
        del index  # unmapped before the folder is published
    search = {**search, "layout": layout}
    return TileIndexReport(folder, enc, n, len(entries), [e["slide_id"] for e in entries], [], True, search)


@contextlib.contextmanager
def _shard_filler(
    engine: str, address: str | None, st: Store, tmp: Path, shards: list[TileShard]
) -> Iterator[_ondisk.FillShards]:
    """How the shards are filled: here one after the other, or as tasks of a Ray cluster whose nodes see the store."""
    if engine == "local":
        yield _ondisk.one_by_one(lambda i, trained, out, held: build_tile_shard(shards[i], trained, out, held))
        return
    with _ray.session(address, RAY_PURPOSE) as ray:
        _ray.check_nodes_see(ray, [st.root], "the store", shared_dir=tmp)
        yield _on_ray(ray, shards)


def _on_ray(ray: Any, shards: list[TileShard]) -> _ondisk.FillShards:
    """Fill the shards as Ray tasks (one CPU each), in parallel; the first that fails stops the others.

    A slide with bad data fails its task with the one-line error that names the file; a shard whose
    workers died more than SHARD_RETRIES times fails as :class:`~embedstore.errors.ClusterFailure`.
    """
    task = ray.remote(num_cpus=1, max_retries=SHARD_RETRIES)(build_tile_shard)

    def fill_shards(trained_file: Path, out_files: list[Path], held: _ondisk.HeldOut | None) -> list[_ondisk.ShardTop]:
        held_ref = ray.put(held)  # one copy in the object store for every task
        refs = [task.remote(s, str(trained_file), str(o), held_ref) for s, o in zip(shards, out_files, strict=True)]
        number = {ref: i + 1 for i, ref in enumerate(refs)}
        waiting = list(refs)
        with _ray.cluster_errors("the tile index is left as it was; rerun the build"):
            try:
                while waiting:
                    done, waiting = ray.wait(waiting, num_returns=1)
                    ray.get(done)
                    step("shard %d/%d filled on the cluster", number[done[0]], len(refs))
            except ray.exceptions.RayError as e:
                for ref in waiting:  # no task may still write into the folder being built when it is removed
                    ray.cancel(ref, force=True)
                for ref in waiting:
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.get(ref)
                if isinstance(getattr(e, "cause", None), EmbedstoreError):
                    # Ray's wrapper is also an instance of the cause's class, its text a traceback
                    raise e.cause from None
                raise
            return ray.get(refs)

    return fill_shards


def _shards(st, enc, fingerprint, slides, bases, sizes, per_shard: int) -> list[TileShard]:
    """Whole slides grouped in id order into shards of about ``per_shard`` tiles."""
    groups: list[list[int]] = [[]]
    rows = 0
    for i, size in enumerate(sizes):
        if groups[-1] and rows + size > per_shard:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += size
    root = str(st.root)
    pick = lambda seq, g: tuple(seq[i] for i in g)  # noqa: E731
    return [TileShard(root, enc, fingerprint, pick(slides, g), pick(bases, g), pick(sizes, g)) for g in groups]


def _concat_tiles(parts: list[Path], tmp: Path) -> None:
    """The shards' tile rows, in id order, streamed into one ``tiles.parquet``."""
    writer = None
    try:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                table = pa.Table.from_batches([batch])
                writer = writer or pq.ParquetWriter(tmp / TILES_FILE, table.schema)
                writer.write_table(table.cast(writer.schema))
            part.unlink()
    finally:
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------------ updating


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
    tiles = read_tiles(folder, old)
    entries, added, vectors = _read_all(st, new, fingerprint, int(old["next_id"]))
    ondisk = is_ondisk(old)
    size_hint = int(tiles.nbytes) + sum(old.get("files", {}).values()) + vectors.nbytes
    with atomic_folder(folder, size_hint=size_hint) as tmp:
        if ondisk:
            # the published lists stay untouched: a copy is updated and published with the new folder
            read_index(folder, old, mmap=True)  # checks the files against the manifest
            shutil.copyfile(folder / IVFDATA_FILE, tmp / IVFDATA_FILE)
            index = read_ondisk_index(folder / INDEX_FILE, tmp / IVFDATA_FILE, writable=True)
        else:
            index = read_index(folder, old, mmap=False)
        with _ondisk.stdout_to_stderr() if ondisk else nullcontext():
            if gone:
                drop = np.zeros(int(old["next_id"]), dtype=bool)
                for e in gone:
                    drop[e["base"] : e["base"] + e["n"]] = True
                bitmap = np.packbits(drop, bitorder="little")
                index.remove_ids(faiss.IDSelectorBitmap(len(drop), faiss.swig_ptr(bitmap)))
                tiles = tiles.filter(pa.array(~drop[tiles.column("id").to_numpy()]))
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
        _write(tmp, index, tiles, manifest)
        del index  # unmapped before the folder is published
    gone_names = [e["slide_id"] for e in gone]
    return dataclasses.replace(
        report, n_tiles=manifest["n_tiles"], n_slides=len(manifest["slides"]),
        added=[s.slide_id for s in new], removed=gone_names,
    )  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(tmp: Path, index: Any, tiles: pa.Table | None, manifest: dict[str, Any]) -> None:
    """Write the index, the tiles (unless already there) and, last, the manifest with every file's size."""
    faiss = import_faiss("build_tile_index")
    if "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    if tiles is not None:
        pq.write_table(tiles, tmp / TILES_FILE)
    names = (INDEX_FILE, TILES_FILE, IVFDATA_FILE) if is_ondisk(manifest) else (INDEX_FILE, TILES_FILE)
    manifest["files"] = {name: (tmp / name).stat().st_size for name in names}
    # written last: a folder without it is no index
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------ loading
