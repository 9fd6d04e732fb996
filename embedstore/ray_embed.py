"""The Ray engine of the embedding stage: a cohort on a cluster, the store written as the local engine writes it.

Data flow::

    this process: skip the published slides, find what earlier runs staged (under each slide's lock)
    Ray tasks:    tile tables (tissue detection), while every node checks it sees the slides
    Ray Data:     tile reading (CPU tasks) -> encoder actors (one model load each per run; a GPU each)
    this process: stage every batch as it comes back, publish each slide when all its tiles are in

Only this process writes the store, with the local engine's slide locks (held from a slide's
first batch back to its publication), staging and atomic publish, so the table is the local
engine's. A worker, an actor or a node that dies loses only its batches in flight (Ray runs
them again; rows seen twice are dropped); a rerun after this process dies resumes from the
staged batches. Workers need the slides (and local weights) at the same path on every node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore import _ray
from embedstore._progress import counter, step
from embedstore._schema import Col
from embedstore.errors import BadInput, ClusterFailure
from embedstore.slide_jobs import (
    EmbedSettings,
    SlideJob,
    SlideResult,
    missing_image,
    published_result,
    slide_failure,
)

LOG = logging.getLogger(__name__)

CHUNK_BATCHES = 8  # forward batches per tile-reading task
_SLIDE_MPP = "embedstore.slide_mpp"  # tile-table schema metadata: the slide's level-0 µm/px
_STAIN = "embedstore.stain"  # tile-table schema metadata: the slide's stain (stain_norm), 8 numbers


PURPOSE = "embed --engine ray"


def preflight(address: str | None) -> None:
    """Fail in one line, before anything is written, when Ray is missing or the cluster does not answer."""
    _ray.preflight(address, PURPOSE)


@dataclasses.dataclass
class _Slide:
    """A slide of the run: its tile table, the rows to read, and (once its first batch is back) its lock and writer."""

    job: SlideJob
    tiles: pa.Table
    todo: np.ndarray  # rows not staged when the run was planned: what the cluster reads
    seen: np.ndarray  # bool per row of `tiles`: staged by this run or an earlier one
    start: float
    lock: contextlib.ExitStack | None = None
    writer: Any = None
    busy: bool = False  # another run took the slide's lock; tried again after this pass
    result: SlideResult | None = None  # set once the slide is published, skipped or failed


def embed_slides(
    jobs: list[SlideJob], out: Any, meta: dict, settings: EmbedSettings, address: str | None
) -> list[SlideResult]:
    """Embed ``jobs`` on the Ray cluster at ``address`` into store ``out``; one result per job."""
    with _ray.session(address, PURPOSE) as ray:
        return _embed_on(ray, jobs, out, meta, settings)


def _absolute(jobs: list[SlideJob], settings: EmbedSettings) -> tuple[list[SlideJob], EmbedSettings, list[Path]]:
    """Jobs and settings with absolute paths (workers do not run in this folder), and the files workers need."""
    jobs = [dataclasses.replace(j, path=Path(j.path).resolve()) if j.path is not None else j for j in jobs]
    needed = [j.path for j in jobs if j.path is not None]
    weights = settings.weights
    if weights and weights.startswith("local-dir:"):
        weights = f"local-dir:{Path(weights.removeprefix('local-dir:')).resolve()}"
        needed.append(Path(weights.removeprefix("local-dir:")))
    elif weights and Path(weights).exists():
        weights = str(Path(weights).resolve())
        needed.append(Path(weights))
    return jobs, dataclasses.replace(settings, weights=weights), needed


def _embed_on(ray: Any, jobs: list[SlideJob], out: Any, meta: dict, settings: EmbedSettings) -> list[SlideResult]:
    _ray.check_store_filesystem(out.root)
    jobs, settings, needed = _absolute(jobs, settings)
    results: dict[str, SlideResult] = {}
    pending = []
    for job in jobs:
        if job.path is None:
            results[job.slide_id] = missing_image(job, settings)
        elif (done := _done(job, out, meta, settings, blocking=False)) is not None:
            results[job.slide_id] = done
        else:
            pending.append(job)
    tables = {}
    # Each node checks it sees the files while the tile tables are computed; no tile is read before both.
    tile_tables = _tile_tables(ray, pending, settings)
    _ray.check_nodes_see(ray, needed, "the slides and local weights")
    for job, table in zip(pending, ray.get(tile_tables), strict=True):
        if isinstance(table, BaseException):
            results[job.slide_id] = slide_failure(job, table, 0.0, out.root)
        else:
            tables[job.slide_id] = table
    pending = [j for j in pending if j.slide_id in tables]
    bar = counter(sum(t.num_rows for t in tables.values()) if settings.progress else 0, "tiles", unit="tile")
    slides = [_plan(job, tables[job.slide_id], out, meta, settings, bar) for job in pending]
    try:
        _embed_pass(ray, slides, out, meta, settings, bar)
    except ClusterFailure as e:  # Ray gave up (e.g. an actor cancelled at start): once more from what is staged
        LOG.warning("%s; resuming once", e)
        left = [s.job for s in slides if s.result is None and not s.busy]
        retry = [_plan(job, tables[job.slide_id], out, meta, settings, _uncounted) for job in left]
        _embed_pass(ray, retry, out, meta, settings, bar)
        slides = [s for s in slides if s.result is not None or s.busy] + retry
    busy = [s.job for s in slides if s.busy]
    for job in busy:  # wait for the other run, then skip (it completed the slide) or resume (it died)
        done = _done(job, out, meta, settings, blocking=True)
        if done is not None:
            results[job.slide_id] = done
    again = [_plan(j, tables[j.slide_id], out, meta, settings, _uncounted) for j in busy if j.slide_id not in results]
    _embed_pass(ray, again, out, meta, settings, bar)
    for s in slides + again:
        if s.result is not None:
            results[s.job.slide_id] = s.result
        elif s.busy:  # taken again by another run between the two passes
            reason = f"{s.job.path}: another run holds the slide; rerun when it ends"
            results[s.job.slide_id] = SlideResult(s.job.slide_id, "failed", 0, 0.0, reason)
    bar(0, close=True)
    return [results[j.slide_id] for j in jobs]


def _uncounted(n: int, close: bool = False) -> None:
    """The progress update of a second look at a slide: its staged tiles are already on the bar."""


def _done(job: SlideJob, out: Any, meta: dict, settings: EmbedSettings, blocking: bool) -> SlideResult | None:
    """The slide's result when it needs no embedding (published, or failed its checks); None otherwise.

    Taken under the slide's lock; a slide another run holds is not done (it is tried again later).
    """
    with out.lock_slide(meta["name"], settings.cohort, job.slide_id, blocking=blocking) as acquired:
        if not acquired:
            return None
        try:
            return published_result(job, out, meta, settings.geometry, settings.cohort)
        except Exception as e:  # noqa: BLE001  (a wrong fingerprint or geometry fails this slide only)
            return slide_failure(job, e, 0.0, out.root)


def _light_job(job: SlideJob) -> SlideJob:
    """The job without its expression counts: what a tile table needs (spot ids and centres)."""
    if job.spots is None:
        return job
    import anndata as ad

    spots = ad.AnnData(obs=job.spots.obs[[Col.SPOT_ID]].copy(), obsm={"spatial": np.asarray(job.spots.obsm["spatial"])})
    return dataclasses.replace(job, spots=spots)


def _tile_table_task(job: SlideJob, settings: EmbedSettings) -> pa.Table | BaseException:
    """Run on a worker: the slide's tile table (the local engine's), or the error that stopped it."""
    from embedstore import slides
    from embedstore.slide_jobs import tile_table
    from embedstore.stain import slide_stain_params

    try:
        with slides.open_slide(job.path, mpp=job.mpp, slide_id=job.slide_id) as slide:
            tiles = tile_table(job, slide, settings.target_mpp, settings.size_px, settings.min_tissue)
            # the level-0 µm/px, for the slide's recorded source (the driver never opens the slide)
            tiles = tiles.replace_schema_metadata({**(tiles.schema.metadata or {}), _SLIDE_MPP: repr(slide.mpp)})
            if settings.stain_norm is not None and tiles.num_rows:
                # the slide's stain, fitted once here as the local engine does; the reading tasks normalise with it
                stain = slide_stain_params(slide, settings.target_mpp).to_array().tolist()
                tiles = tiles.replace_schema_metadata({**tiles.schema.metadata, _STAIN: json.dumps(stain)})
    except Exception as e:  # noqa: BLE001  (returned, so the driver reports it per slide)
        return e
    if tiles.num_rows == 0:
        msg = f"{job.path}: no tiles (no tissue found at {settings.target_mpp} µm/px); check the slide or lower --min-tissue"
        return BadInput(msg)
    return tiles


def _slide_mpp(tiles: pa.Table) -> float | None:
    """The level-0 µm/px :func:`_tile_table_task` put into a tile table's schema metadata."""
    found = (tiles.schema.metadata or {}).get(_SLIDE_MPP.encode())
    return None if found is None else float(found)


def _stain(tiles: pa.Table) -> np.ndarray:
    """The stain :func:`_tile_table_task` put into a tile table's schema metadata (8 numbers; NaN: none)."""
    found = (tiles.schema.metadata or {}).get(_STAIN.encode())
    return np.full(8, np.nan) if found is None else np.array(json.loads(found), dtype=np.float64)


def _tile_tables(ray: Any, jobs: list[SlideJob], settings: EmbedSettings) -> list[Any]:
    """Ray tasks computing the tile tables of ``jobs`` in parallel (object refs: ``ray.get`` waits)."""
    task = ray.remote(num_cpus=1, max_retries=3)(_tile_table_task)
    return [task.remote(_light_job(job), settings) for job in jobs]


def _plan(job: SlideJob, tiles: pa.Table, out: Any, meta: dict, settings: EmbedSettings, bar: Any) -> _Slide:
    """The slide's rows to read: its tile table less what an earlier run staged (looked up under its lock)."""
    seen = np.zeros(tiles.num_rows, dtype=bool)
    failed = None
    with out.lock_slide(meta["name"], settings.cohort, job.slide_id, blocking=False) as acquired:
        try:
            if acquired:
                writer = out.slide_writer(meta, settings.cohort, job.slide_id, settings.geometry, tiles.num_rows)
                staged = writer.done_tile_ids()
                if staged:
                    seen = np.isin(tiles.column(Col.TILE_ID).to_numpy(zero_copy_only=False), list(staged))
                    LOG.info("%s: resuming, %d of %d tiles already staged", job.slide_id, int(seen.sum()), len(seen))
        except Exception as e:  # noqa: BLE001  (e.g. batches staged with another fingerprint: this slide fails)
            failed = slide_failure(job, e, 0.0, out.root)
    bar(int(seen.sum()) if failed is None else tiles.num_rows)
    todo = np.flatnonzero(~seen).astype(np.int64) if failed is None else np.zeros(0, dtype=np.int64)
    return _Slide(job, tiles, todo, seen, time.perf_counter(), result=failed)


def _open(s: _Slide, out: Any, meta: dict, settings: EmbedSettings) -> None:
    """Take the slide's lock and start (or resume) its writer, when its first batch is back.

    A slide another run took meanwhile is left to it (``busy``); one it published is skipped.
    """
    lock = contextlib.ExitStack()
    if not lock.enter_context(out.lock_slide(meta["name"], settings.cohort, s.job.slide_id, blocking=False)):
        lock.close()
        LOG.info("slide %s is being embedded by another run; coming back to it", s.job.slide_id)
        s.busy = True
        return
    s.lock = lock
    try:
        s.result = published_result(s.job, out, meta, settings.geometry, settings.cohort)
        if s.result is None:
            if s.job.spots is not None:
                out.write_spots_anndata(settings.cohort, s.job.slide_id, s.job.spots)
            source = settings.source(s.job, slide_mpp=_slide_mpp(s.tiles))
            s.writer = out.slide_writer(
                meta, settings.cohort, s.job.slide_id, settings.geometry, s.tiles.num_rows, source
            )
            staged = s.writer.done_tile_ids()  # what this run planned around, or more if another run added some
            if staged:
                s.seen |= np.isin(s.tiles.column(Col.TILE_ID).to_numpy(zero_copy_only=False), list(staged))
    except Exception as e:  # noqa: BLE001  (the summary names the slide)
        s.result = slide_failure(s.job, e, time.perf_counter() - s.start, out.root)
    if s.result is not None:
        _release(s)


def _release(s: _Slide) -> None:
    if s.lock is not None:
        s.lock.close()
        s.lock = None


def _publish(s: _Slide, out: Any, settings: EmbedSettings) -> None:
    """Commit a slide whose every tile is staged, and release its lock."""
    try:
        s.writer.commit(tile_ids=s.tiles.column(Col.TILE_ID).to_pylist())
    except Exception as e:  # noqa: BLE001
        s.result = slide_failure(s.job, e, time.perf_counter() - s.start, out.root)
    else:
        seconds = time.perf_counter() - s.start
        s.result = SlideResult(s.job.slide_id, "done", s.tiles.num_rows, seconds)
        if settings.progress:
            step("%s: %d tiles embedded (%.1f s)", s.job.slide_id, s.tiles.num_rows, seconds)
    _release(s)


def _fail(s: _Slide, reason: str) -> None:
    LOG.error("%s", reason)
    s.result = SlideResult(s.job.slide_id, "failed", 0, time.perf_counter() - s.start, reason)
    _release(s)


def _read_items(slides: list[_Slide], batch_size: int) -> list[dict[str, Any]]:
    """One tile-reading task per CHUNK_BATCHES forward batches of a slide: path, rows and their coordinates."""
    items = []
    step_rows = batch_size * CHUNK_BATCHES
    for k, s in enumerate(slides):
        x = s.tiles.column(Col.X).to_numpy()
        y = s.tiles.column(Col.Y).to_numpy()
        mpp = s.tiles.column(Col.MPP).to_numpy()
        size = s.tiles.column(Col.SIZE_PX).to_numpy()
        for lo in range(0, len(s.todo), step_rows):
            rows = s.todo[lo : lo + step_rows]
            items.append(
                {
                    "slide": k,
                    "path": str(s.job.path),
                    "slide_mpp": math.nan if s.job.mpp is None else float(s.job.mpp),
                    "rows": rows,
                    "x": x[rows],
                    "y": y[rows],
                    "mpp": mpp[rows],
                    "size_px": size[rows],
                    "stain": _stain(s.tiles),
                }
            )
    return items


def read_tiles(batch: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the pixels of one chunk of a slide's tiles, ``batch_size`` at a time.

    A tile that cannot be read marks the rest of its chunk with the error (the driver fails
    the slide and names the error); it is never retried as a worker fault would be.
    """
    from embedstore.stain import REFERENCE, StainParams, normalize
    from embedstore.tiling import TileReader

    for i in range(len(batch["slide"])):
        rows = np.asarray(batch["rows"][i], dtype=np.int64)
        mpp = float(batch["slide_mpp"][i])
        table = pa.table(
            {
                Col.X: np.asarray(batch["x"][i]),
                Col.Y: np.asarray(batch["y"][i]),
                Col.MPP: np.asarray(batch["mpp"][i]),
                Col.SIZE_PX: np.asarray(batch["size_px"][i]),
            }
        )
        slide = np.full(len(rows), batch["slide"][i], dtype=np.int32)
        stain = np.asarray(batch["stain"][i], dtype=np.float64)
        params = StainParams.from_array(stain) if np.isfinite(stain).all() else None
        try:
            reader = TileReader(str(batch["path"][i]), table, mpp=None if math.isnan(mpp) else mpp)
        except Exception as e:  # noqa: BLE001
            yield _error_rows(slide, rows, table, f"{batch['path'][i]}: {type(e).__name__}: {e}")
            continue
        for lo in range(0, len(rows), batch_size):
            hi = min(lo + batch_size, len(rows))
            try:
                images = np.stack([reader[j] for j in range(lo, hi)])
                if params is not None:  # the local engine's normalisation, pixel for pixel
                    images = normalize(images, params, REFERENCE)
            except Exception as e:  # noqa: BLE001
                yield _error_rows(slide[lo:], rows[lo:], table, f"{batch['path'][i]}: {type(e).__name__}: {e}")
                break
            yield {"slide": slide[lo:hi], "row": rows[lo:hi], "image": images, "error": np.full(hi - lo, "")}


def _error_rows(slide: np.ndarray, rows: np.ndarray, table: pa.Table, reason: str) -> dict[str, np.ndarray]:
    size = int(table.column(Col.SIZE_PX)[0].as_py()) if table.num_rows else 1
    images = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
    return {"slide": slide, "row": rows, "image": images, "error": np.full(len(rows), reason)}


class EncoderActor:
    """Ray Data actor: one encoder, loaded once, embedding batches of tiles.

    Subclassed per run with the run's settings as class attributes (:func:`_actor_class`):
    Ray keeps constructor arguments in its object store, where a restart could lose them.
    """

    settings: EmbedSettings
    threads: int

    def __init__(self) -> None:
        import torch

        from embedstore.encoders import create_encoder

        torch.set_num_threads(self.threads)
        self.encoder = create_encoder(self.settings.encoder, weights=self.settings.weights).to(self.settings.device)
        self.transform = self.encoder.transform()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        embeddings = None
        if ok.all():
            embeddings = np.asarray(self.encoder.forward(self.transform(batch["image"])), dtype=np.float32)
        elif ok.any():
            part = np.asarray(self.encoder.forward(self.transform(batch["image"][ok])), dtype=np.float32)
            embeddings = np.zeros((len(ok), part.shape[1]), dtype=np.float32)
            embeddings[ok] = part
        else:
            embeddings = np.zeros((len(ok), 1), dtype=np.float32)  # no row of it is used
        return {"slide": batch["slide"], "row": batch["row"], "embedding": embeddings, "error": batch["error"]}


def _embed_pass(ray: Any, slides: list[_Slide], out: Any, meta: dict, settings: EmbedSettings, bar: Any) -> None:
    """One streaming pass over ``slides``: read and encode on the cluster, stage and publish here.

    One Ray Data pipeline for the whole pass, so each actor loads its model once. A slide's lock
    is held from its first batch back to its publication; rows that come back twice (a task Ray
    ran again) are dropped; a slide whose tiles did not all come back fails (a rerun resumes it).
    """
    try:
        items = _read_items(slides, settings.batch_size)
        if items:
            n_actors, resources, threads = _ray.encoder_actors(ray)
            actor = type("EncoderActor", (EncoderActor,), {"settings": settings, "threads": threads})
            data = ray.data.from_items(items, override_num_blocks=len(items))
            data = data.map_batches(read_tiles, batch_size=1, num_cpus=1, fn_kwargs={"batch_size": settings.batch_size})
            data = data.map_batches(
                actor, batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=n_actors), **resources
            )
            with _ray.cluster_errors("staged batches are kept, rerun to resume"):
                for batch in data.iter_batches(batch_format="numpy", batch_size=None):
                    _stage(slides, batch, out, meta, settings, bar)
        for s in slides:  # slides with nothing left to read, and those whose tiles did not all come back
            if s.result is None and not s.busy and s.writer is None:
                _open(s, out, meta, settings)
            if s.result is None and not s.busy:
                if s.seen.all():
                    _publish(s, out, settings)
                else:
                    lost = int((~s.seen).sum())
                    _fail(
                        s, f"{s.job.path}: {lost} tiles did not come back from the cluster; rerun to resume the slide"
                    )
    finally:
        for s in slides:
            _release(s)


def _stage(
    slides: list[_Slide], batch: dict[str, np.ndarray], out: Any, meta: dict, settings: EmbedSettings, bar: Any
) -> None:
    """Stage one batch of embeddings; publish each slide whose last tile it holds."""
    for k in np.unique(batch["slide"]):
        s = slides[int(k)]
        if s.result is None and not s.busy and s.writer is None:
            _open(s, out, meta, settings)
        if s.result is not None or s.busy:
            continue
        mine = batch["slide"] == k
        errors = batch["error"][mine]
        if (errors != "").any():
            _fail(s, str(errors[errors != ""][0]))
            continue
        rows = batch["row"][mine]
        new = ~s.seen[rows]
        rows, embeddings = rows[new], batch["embedding"][mine][new]
        if len(rows):
            try:
                s.writer.append(s.tiles.take(pa.array(rows)), embeddings)
            except Exception as e:  # noqa: BLE001  (a full disk re-raises from slide_failure and stops the run)
                s.result = slide_failure(s.job, e, time.perf_counter() - s.start, out.root)
                _release(s)
                continue
            s.seen[rows] = True
            bar(len(rows))
        if s.seen.all():
            _publish(s, out, settings)
