"""The embedding stage: slides (or an ST data set) -> tiles -> encoder -> Parquet store.

One orchestrating function, :func:`embed`. Tiles are read and preprocessed by DataLoader
workers while the model runs; each batch is staged durably, so a crash loses at most the
batch in flight and a rerun resumes. A per-slide OS lock (released by the kernel when a
process dies) keeps two concurrent runs from embedding the same slide twice. A failing
slide does not stop the others: every run ends with a per-slide summary and a non-zero
status when any requested slide has no rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._params import validated
from embedstore._progress import counter, step
from embedstore._schema import Col, geometry
from embedstore.errors import (
    BadInput,
    EmbedstoreError,
)
from embedstore.slide_jobs import (
    EmbedSettings,
    SlideJob,
    SlideReport,
    SlideResult,
    missing_image,
    published_result,
    slide_failure,
    tile_table,
)
from embedstore.stain import REFERENCE, StainTransform, slide_stain_params, stain_metadata, stain_setting

LOG = logging.getLogger(__name__)

SLIDE_SUFFIXES = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".jpg", ".jpeg", ".png",
)  # fmt: skip


@dataclasses.dataclass
class EmbedReport(SlideReport):
    """Per-slide outcome of :func:`embed` (``ok``, ``summary()``), and where the table is."""

    store: Path
    encoder: str
    cohort: str
    results: list[SlideResult]


def find_jobs(
    data: str | Path,
    mpp: float | None = None,
    mpp_csv: str | Path | None = None,
) -> tuple[list[SlideJob], str]:
    """Resolve DATA into slide jobs: a slide file, a folder of slides, or an ST data set.

    Parameters
    ----------
    data
        A slide file, a folder of slide files, or a spatial-transcriptomics data set in a
        layout :func:`embedstore.spots.read_dataset` accepts.
    mpp
        µm/px for every slide (overrides slide metadata).
    mpp_csv
        CSV with columns ``slide,mpp`` giving µm/px per slide (file name or slide id).

    Returns
    -------
    The jobs, and the default cohort name (the data folder's name).
    """
    from embedstore import slides, spots

    path = Path(data)
    if not path.exists():
        msg = f"{path}: no such file or folder; pass a slide, a folder of slides, or an ST data set"
        raise BadInput(msg)
    per_slide = slides.read_mpp_csv(mpp_csv) if mpp_csv else {}
    cohort = path.stem if path.is_file() else path.name

    if path.is_dir() and spots.detect_layout(path) is not None:
        jobs = []
        # join=None: each section keeps exactly the genes it measured; readers intersect later.
        for section in spots.read_dataset(path, join=None):
            info = section.uns["embedstore"]
            image = Path(info["image_path"]) if info.get("image_path") else None
            jobs.append(SlideJob(info["slide_id"], image, mpp or info.get("mpp"), section))
        return jobs, cohort

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not files:
        msg = f"{path}: no slides found (looked for {', '.join(SLIDE_SUFFIXES)}); pass a slide or a folder of slides"
        raise BadInput(msg)
    jobs = []
    for f in files:
        slide_mpp = mpp or per_slide.get(f.name) or per_slide.get(f.stem)
        jobs.append(SlideJob(f.stem, f, slide_mpp))
    return jobs, cohort


@validated
def embed(
    data: str | Path,
    store: str | Path,
    encoder: str | None = None,
    *,
    weights: str | None = None,
    cohort: str | None = None,
    mpp: float | None = None,
    mpp_csv: str | Path | None = None,
    target_mpp: float | None = None,
    size_px: int = 224,
    min_tissue: float = 0.25,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 2,
    loader: str = "auto",
    progress: bool = True,
    slide_ids: Sequence[str] | None = None,
    engine: str = "local",
    address: str | None = None,
    stain_norm: str | None = None,
) -> EmbedReport:
    """Embed a slide, a folder of slides, or an ST data set into a Parquet store.

    Slides already complete in the store are skipped; slides a crashed run left partial
    resume from their staged batches. ST data sets get spot-centred tiles and their
    spots and counts are written to the store for SQL joins; plain slides get a tissue grid.

    Parameters
    ----------
    data
        See :func:`find_jobs`.
    store
        Store folder; created when missing.
    encoder
        Registered encoder name (see ``list_encoders()``); the built-in encoder by default.
    weights
        Where the encoder's weights are: ``hf-hub:org/repo``, ``local-dir:/path`` or a file.
    cohort
        Cohort name in the store; defaults to the data folder's name.
    mpp, mpp_csv
        µm/px for slides whose metadata lacks it (see :func:`find_jobs`).
    target_mpp
        µm/px to tile at; defaults to the encoder's own (usually 0.5).
    size_px
        Tile side in pixels at ``target_mpp``.
    min_tissue
        Minimum tissue fraction of a grid tile.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
    batch_size, workers
        Tiles per forward pass, and readers working while the model runs.
    loader
        ``"threads"``, ``"processes"`` or ``"auto"``; see :func:`iterate_batches`.
    progress
        Show progress: a line per slide, and a bar with tiles/s on a terminal.
    slide_ids
        Embed only these slides (or ST sections) of ``data``; all by default.
    engine
        ``"local"``: this process and its reader threads. ``"ray"``: a Ray cluster reads tiles
        in CPU tasks and runs the encoder in actors (one model load each, a GPU each when
        CUDA is present); this process writes the store, with the same locks, staging and
        atomic publish, so the table is the local engine's (see :mod:`embedstore.ray_embed`).
    address
        Ray cluster address (``host:port``) for ``engine="ray"``; default: ``RAY_ADDRESS``,
        else a Ray instance started on this machine.
    stain_norm
        ``"macenko"``: normalise every tile's stain to :data:`embedstore.stain.REFERENCE` before
        the encoder, with the slide's stain fitted once on its tissue (:mod:`embedstore.stain`);
        a slide without a stain to fit fails. The stored fingerprint then covers the stain
        setting, so normalised and raw embeddings are never mixed. ``None``: tiles as read.

    A published slide file that is damaged (truncated, zeroed, empty, incomplete, or not
    embedstore's) is not done: it is moved to ``STORE/_quarantine/`` with a warning and the
    slide is embedded again. A slide stored with another encoder fingerprint or tile geometry
    fails with a line naming both.
    """
    from embedstore.encoders import DEFAULT_ENCODER, create_encoder
    from embedstore.store import open_store
    from embedstore.store._files import check_name

    if engine not in ("local", "ray"):
        msg = f"engine {engine!r}: not an engine; use local or ray"
        raise BadInput(msg)
    stain_setting(stain_norm)  # an unknown method is one line, before anything is read or written
    # The input is read and checked before the store folder is created, so bad input leaves nothing.
    jobs, default_cohort = find_jobs(data, mpp=mpp, mpp_csv=mpp_csv)
    if slide_ids is not None:
        unknown = sorted(set(slide_ids) - {j.slide_id for j in jobs})
        if unknown:
            msg = f"{data}: no slides {', '.join(unknown[:5])} here; check the ids (slide ids are file names without suffix)"
            raise BadInput(msg)
        jobs = [j for j in jobs if j.slide_id in set(slide_ids)]
    cohort = check_name(cohort or default_cohort, "cohort")
    if engine == "ray":  # a missing extra or an unreachable cluster fails before the store is created
        from embedstore import ray_embed

        ray_embed.preflight(address)
    out = open_store(store, read_only=False)
    out.check_writable()  # before the model is loaded and any tile is read
    # On Ray this copy of the encoder only names and fingerprints it; the actors run their own.
    enc = create_encoder(encoder or DEFAULT_ENCODER, weights=weights).to(device if engine == "local" else "cpu")
    settings = EmbedSettings(
        data=Path(data),
        cohort=cohort,
        encoder=enc.name,
        weights=weights,
        target_mpp=target_mpp or enc.cfg.target_mpp,
        size_px=size_px,
        min_tissue=min_tissue,
        device=device,
        batch_size=batch_size,
        workers=workers,
        loader=loader,
        progress=progress,
        stain_norm=stain_norm,
    )
    LOG.info("embedding %d slide(s) of cohort %s with %s into %s", len(jobs), cohort, enc.name, out.root)
    if engine == "ray":
        results = ray_embed.embed_slides(jobs, out, stain_metadata(enc.metadata(), stain_norm), settings, address)
    else:
        results = _embed_slides_here(jobs, out, enc, settings)
    return EmbedReport(out.root, enc.name, cohort, results)


def _embed_slides_here(jobs: list[SlideJob], out: Any, enc: Any, settings: EmbedSettings) -> list[SlideResult]:
    """The local engine: slide after slide in this process, tiles read by threads or worker processes."""
    meta = stain_metadata(enc.metadata(), settings.stain_norm)
    results: dict[str, SlideResult] = {}
    deferred: list[SlideJob] = []

    def run(job: SlideJob, blocking: bool) -> bool:
        start = time.perf_counter()
        if job.path is None:
            results[job.slide_id] = missing_image(job, settings)
            return True
        with out.lock_slide(enc.name, settings.cohort, job.slide_id, blocking=blocking) as acquired:
            if not acquired:
                return False
            try:
                published = published_result(job, out, meta, settings.geometry, settings.cohort)
                if published is not None:
                    results[job.slide_id] = published
                    return True
                n = _embed_slide(
                    job,
                    out,
                    enc,
                    meta,
                    settings.cohort,
                    (settings.target_mpp, settings.size_px, settings.min_tissue),
                    (settings.batch_size, settings.workers, settings.loader),
                    settings.progress,
                    functools.partial(settings.source, job),
                    settings.stain_norm,
                )
            except Exception as e:  # noqa: BLE001  (one broken slide must not stop the cohort; the summary names it)
                results[job.slide_id] = slide_failure(job, e, time.perf_counter() - start, out.root)
            else:
                results[job.slide_id] = SlideResult(job.slide_id, "done", n, time.perf_counter() - start)
                if settings.progress:
                    step("%s: %d tiles embedded (%.1f s)", job.slide_id, n, time.perf_counter() - start)
        return True

    for job in jobs:
        if not run(job, blocking=False):
            LOG.info("slide %s is being embedded by another run; coming back to it", job.slide_id)
            deferred.append(job)
    for job in deferred:  # wait for the other run, then skip (complete) or resume (it died)
        run(job, blocking=True)
    return [results[j.slide_id] for j in jobs]


def _embed_slide(
    job: SlideJob,
    out: Any,
    enc: Any,
    meta: dict,
    cohort: str,
    tiling_args: tuple[float, int, float],
    reading: tuple[int, int, str],
    progress: bool,
    source: Callable[..., dict[str, Any]],
    stain_norm: str | None = None,
) -> int:
    """Embed the tiles of one slide that are not staged yet; publish the slide; return its tile count.

    ``source(slide_mpp=...)`` gives the provenance to record, with the opened slide's level-0 µm/px.
    """
    from embedstore import slides, tiling

    target_mpp, size_px, min_tissue = tiling_args
    batch_size, workers, loader = reading
    with slides.open_slide(job.path, mpp=job.mpp, slide_id=job.slide_id) as slide:
        tiles = tile_table(job, slide, target_mpp, size_px, min_tissue)
        slide_mpp = slide.mpp
        # the slide's stain, fitted once on its tissue (a slide without one fails here, before any tile)
        stain = slide_stain_params(slide, target_mpp) if stain_norm is not None and tiles.num_rows else None
    if tiles.num_rows == 0:
        msg = f"{job.path}: no tiles (no tissue found at {target_mpp} µm/px); check the slide or lower --min-tissue"
        raise BadInput(msg)
    if job.spots is not None:
        out.write_spots_anndata(cohort, job.slide_id, job.spots)
    ids = tiles.column(Col.TILE_ID).to_pylist()
    # The geometry, the tile count and the provenance go into every staged part and the
    # published file: parts of another --target-mpp/--size are refused, not merged.
    writer = out.slide_writer(
        meta, cohort, job.slide_id, geometry(target_mpp, size_px), len(ids), source(slide_mpp=slide_mpp)
    )
    done = writer.done_tile_ids()
    todo = np.array([i for i, t in enumerate(ids) if t not in done], dtype=np.int64)
    if len(done):
        LOG.info("%s: resuming, %d of %d tiles already staged", job.slide_id, len(ids) - len(todo), len(ids))
    reader = tiling.TileReader(job.path, tiles, mpp=job.mpp)
    bar = counter(len(todo) if progress else 0, job.slide_id, unit="tile")
    transform = enc.transform() if stain is None else StainTransform(stain, REFERENCE, enc.transform())
    for rows, batch in iterate_batches(reader, todo, transform, batch_size, workers, loader):
        embeddings = enc.forward(batch)
        writer.append(tiles.take(pa.array(rows)), embeddings)
        bar(len(rows))
    bar(0, close=True)
    writer.commit(tile_ids=ids)
    return len(ids)


@validated
def iterate_batches(
    reader: Any,
    indices: np.ndarray,
    transform: Callable[[np.ndarray], Any],
    batch_size: int,
    workers: int,
    loader: str = "auto",
):
    """Yield ``(row indices, model input)`` batches, read in parallel with the model.

    Parameters
    ----------
    reader
        A :class:`embedstore.tiling.TileReader` (picklable; opens its slide once per worker).
    indices
        Rows of the reader's tile table to read, in order.
    transform
        The encoder's batch transform, uint8 ``(B, H, W, 3)`` -> model input.
    batch_size, workers
        Tiles per batch, and readers (0 reads in this process, between forward passes).
    loader
        ``"threads"``: reader threads share memory and the slide handle (OpenSlide and PIL
        release the GIL), uint8 tiles, transform in this thread — cheapest when the model
        runs on the same CPU cores. ``"processes"``: a torch DataLoader whose worker
        processes also run the transform — keeps a GPU fed. ``"auto"``: processes when
        CUDA is available, threads otherwise.
    """
    import torch

    if len(indices) == 0:
        return
    if loader == "auto":
        loader = "processes" if torch.cuda.is_available() else "threads"
    if loader == "threads":
        from embedstore.tiling import iter_tile_batches

        for rows, tiles in iter_tile_batches(reader, batch_size=batch_size, workers=workers, indices=indices):
            yield rows, transform(tiles)
        return
    from torch.utils.data import DataLoader

    data = DataLoader(
        _TileSubset(reader, indices),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_Collate(transform),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    yield from data


class _TileSubset:
    """Map-style dataset over selected rows of a tile reader: item -> (row, uint8 tile)."""

    def __init__(self, reader: Any, indices: np.ndarray) -> None:
        self.reader = reader
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray]:
        row = int(self.indices[j])
        return row, self.reader[row]


class _Collate:
    """Stack tiles and apply the encoder's transform inside the worker process."""

    def __init__(self, transform: Callable[[np.ndarray], Any]) -> None:
        self.transform = transform

    def __call__(self, items: Sequence[tuple[int, np.ndarray]]) -> tuple[np.ndarray, Any]:
        rows = np.fromiter((r for r, _ in items), dtype=np.int64, count=len(items))
        tiles = np.stack([t for _, t in items])
        return rows, self.transform(tiles)


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_store` found, repaired, and left."""

    store: Path
    n_files: int
    found: list[str]  # one line per problem found
    repaired: list[str]  # one line per repair made
    remaining: list[str]  # problems still there
    notes: list[str]  # facts that are not problems (partial slides, quarantined files)

    @property
    def ok(self) -> bool:
        """True when no problem remains."""
        return not self.remaining

    def summary(self) -> str:
        """One line: files checked, problems found, repaired and left."""
        text = f"{self.n_files} files checked, {len(self.found)} problem(s) found"
        if self.repaired:
            text += f", {len(self.repaired)} repair(s) made"
        if self.remaining:
            text += f", {len(self.remaining)} remain"
            if not self.repaired:
                text += f"; `embedstore check {self.store} --repair` repairs them"
        return text


def check_store(store: str | Path, repair: bool = False, *, device: str = "auto", workers: int = 2) -> CheckReport:
    """Verify every file of a store (like ``git fsck``) and, with ``repair``, rebuild what is damaged.

    Every slide file, staged batch, spots and expression file is read completely (page
    CRCs included). Repair moves damaged or foreign files to ``STORE/_quarantine/`` (never
    deletes them), removes staging left by runs killed after publishing, and re-embeds
    damaged slides (and rewrites damaged spots/expression) from the source and settings
    recorded when they were embedded.

    Parameters
    ----------
    store
        Store folder.
    repair
        Repair what can be repaired; otherwise only report.
    device, workers
        Passed to :func:`embed` when slides are re-embedded.
    """
    from embedstore.store import open_store, verify_store

    st = open_store(store, read_only=not repair)
    before = verify_store(st)
    found = [p.line() for p in before.problems]
    if not repair:
        return CheckReport(st.root, before.n_files, found, [], list(found), before.notes)
    repaired: list[str] = []
    left: list[str] = []
    todo: dict[tuple, list[str]] = {}  # embed settings -> slide ids to embed with them
    derived: dict[tuple, list[str]] = {}  # (kind, settings...) of a table derived from the store -> slide ids
    for p in before.problems:
        lock = (p.encoder, p.cohort, p.slide_id) if p.encoder else None
        with st.lock_slide(*lock, blocking=False) if lock else _no_lock() as acquired:
            if not acquired:
                left.append(f"{p.path}: being written by another run; check again when it ends")
                continue
            if p.kind == "staging":
                if st.clear_stale_staging(p.encoder, p.cohort, p.slide_id):
                    repaired.append(f"{p.path}: removed (the slide is published)")
                continue
            if p.path.exists():
                repaired.append(f"{p.path}: moved to {st.quarantine(p.path)}")
        if p.kind == "stray":
            continue
        sources = [st.slide_source(p.encoder, p.cohort, p.slide_id)] if p.encoder else st.sources(p.cohort, p.slide_id)
        # spots and expression come from a slide's image source, never from a text table's (the store itself)
        sources = [s for s in sources if s and (p.encoder or s.get("kind") not in ("text", "context"))]
        if not sources:
            left.append(
                f"{p.path}: where the slide was embedded from is not recorded (an older embedstore); "
                f"embed slide {p.slide_id} again with `embedstore embed SOURCE --store {st.root} --cohort {p.cohort}`"
            )
            continue
        src = sources[0]
        if src.get("kind") == "text":  # gene-sentence embeddings: encoded again from the store's own expression
            key = ("text", src["cohort"], src["encoder"], src.get("weights"), src.get("top_n"))
            derived.setdefault(key, []).append(src["slide_id"])
            continue
        if src.get("kind") == "context":  # tissue context: computed again from the store's own embeddings
            key = ("context", src["cohort"], src["encoder"], tuple(src["radii_um"]), src.get("slide_mpp"))
            derived.setdefault(key, []).append(src["slide_id"])
            continue
        if not Path(src["data"]).exists():
            left.append(
                f"{p.path}: its source {src['data']} is gone; embed slide {p.slide_id} again from where it is now"
            )
            continue
        keys = ("data", "cohort", "encoder", "weights", "mpp", "target_mpp", "size_px", "min_tissue", "stain_norm")
        key = tuple(src.get(k) for k in keys)
        todo.setdefault(key, []).append(src["slide_id"])
    for (data, cohort, encoder, weights, mpp, target_mpp, size_px, min_tissue, stain_norm), slide_ids in todo.items():
        try:
            report = embed(
                data, st.root, encoder, weights=weights, cohort=cohort, mpp=mpp, target_mpp=target_mpp,
                size_px=size_px, min_tissue=min_tissue, device=device, workers=workers, progress=False,
                slide_ids=sorted(set(slide_ids)), stain_norm=stain_norm,
            )  # fmt: skip
        except EmbedstoreError as e:
            left.append(f"{data}: re-embedding failed: {e}")
            continue
        for r in report.results:
            if r.status == "failed":
                left.append(f"{data}: slide {r.slide_id} could not be re-embedded: {r.reason}")
            elif r.status == "done":
                repaired.append(
                    f"slide {r.slide_id} of cohort {cohort}: re-embedded from {data} ({r.reason or f'{r.n_tiles} tiles'})"
                )
    left += _repair_derived(st, derived, repaired, device)
    after = verify_store(st)
    remaining = [p.line() for p in after.problems] + left
    return CheckReport(st.root, before.n_files, found, repaired, remaining, after.notes)


def _repair_derived(st: Any, todo: dict[tuple, list[str]], repaired: list[str], device: str) -> list[str]:
    """Make damaged slides of derived tables again from the store itself: gene-sentence embeddings
    (``embedstore embed-text``) and tissue context (``embedstore context``). Returns what could not be."""
    from embedstore.context import embed_context
    from embedstore.text_embedding import embed_text

    left = []
    for (kind, cohort, encoder, *settings), slide_ids in todo.items():
        chosen = sorted(set(slide_ids))
        if kind == "text":
            weights, top_n = settings
            what, make = (
                "gene sentences",
                functools.partial(embed_text, weights=weights, top_n=top_n or 50, device=device),
            )
        else:
            radii, mpp = settings
            what, make = "context", functools.partial(embed_context, radii_um=radii, mpp=mpp)
        try:
            report = make(st.root, encoder, cohort=cohort, slide_ids=chosen, progress=False)
        except EmbedstoreError as e:
            left.append(f"{st.root}: making the {what} of {', '.join(chosen)} again failed: {e}")
            continue
        for r in report.results:
            if r.status == "failed":
                left.append(f"slide {r.slide_id} of cohort {cohort}: {what} could not be made again: {r.reason}")
            elif r.status == "done":
                repaired.append(f"slide {r.slide_id} of cohort {cohort}: {what} made again ({report.table})")
    return left


@contextlib.contextmanager
def _no_lock() -> Iterator[bool]:
    """Spots and expression are written under the embedding slide lock of the run that writes them; nothing to hold."""
    yield True
