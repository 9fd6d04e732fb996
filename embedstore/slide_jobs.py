"""What both embedding engines share, per slide: the job, its settings, its tile table, its result.

:mod:`embedstore.embedding` (the local engine and :func:`~embedstore.embedding.embed`) and
:mod:`embedstore.ray_embed` (the Ray engine) build on these, so a slide is tiled, checked,
recorded and reported the same way whichever engine embeds it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._atomic import disk_full, disk_full_errno
from embedstore._schema import Col, describe_geometry, geometry
from embedstore.errors import DamagedFile, DiskFull, EmbedstoreError, FingerprintMismatch, GeometryMismatch

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class SlideJob:
    """One slide to embed: where it is, how to tile it, and its spots if it has any."""

    slide_id: str
    path: Path | None  # None: an ST section whose image is missing (reported as failed)
    mpp: float | None = None
    spots: Any = None  # AnnData of an ST section (spot-centred tiles), or None (tissue grid)


@dataclasses.dataclass
class SlideResult:
    """What happened to one slide in a run."""

    slide_id: str
    status: str  # "done" | "skipped" | "failed"
    n_tiles: int = 0
    seconds: float = 0.0
    reason: str = ""


class SlideReport:
    """What a per-slide report offers: ``ok`` and a plain-text ``summary`` of its ``results``."""

    results: list[SlideResult]

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return all(r.status != "failed" for r in self.results)

    def summary(self) -> str:
        """A plain-text table, one line per slide."""
        return results_table(self.results)


def results_table(results: Sequence[SlideResult]) -> str:
    """Per-slide results as a plain-text table, with the counts by status on the last line."""
    lines = [f"{'slide':<32} {'status':<8} {'tiles':>7} {'s':>7}  reason"]
    for r in results:
        lines.append(f"{r.slide_id:<32} {r.status:<8} {r.n_tiles:>7} {r.seconds:>7.1f}  {r.reason}")
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """How the slides of one :func:`embed` call are tiled, read and encoded (what both engines share)."""

    data: Path
    cohort: str
    encoder: str
    weights: str | None
    target_mpp: float
    size_px: int
    min_tissue: float
    device: str
    batch_size: int
    workers: int
    loader: str
    progress: bool
    stain_norm: str | None = None  # stain normalisation of every tile (embedstore.stain), or None

    @property
    def geometry(self) -> dict:
        """The tile geometry every file of this run records."""
        return geometry(self.target_mpp, self.size_px)

    def source(self, job: SlideJob, slide_mpp: float | None = None) -> dict[str, Any]:
        """Where a slide was embedded from and how (recorded beside it, so `check --repair` can redo it).

        ``slide_mpp`` is the level-0 µm/px the slide was tiled with (the opened slide's ``mpp``):
        tile centres are level-0 pixels, and this turns them into µm (:mod:`embedstore.context`).
        """
        source = {
            "data": str((self.data if job.spots is not None else Path(job.path)).resolve()),
            "kind": "st" if job.spots is not None else "slide",
            "cohort": self.cohort,
            "slide_id": job.slide_id,
            "mpp": job.mpp,
            "slide_mpp": None if slide_mpp is None else float(slide_mpp),
            "encoder": self.encoder,
            "weights": self.weights,
            "target_mpp": self.target_mpp,
            "size_px": self.size_px,
            "min_tissue": self.min_tissue,
        }
        if job.spots is not None and job.path is not None:  # what a prediction's H&E needs, without the counts
            source["image"] = str(Path(job.path).resolve())
            source["spot_diameter_um"] = job.spots.uns["embedstore"].get("spot_diameter_um")
        if self.stain_norm is not None:  # recorded only when set: sources of runs without it stay as they were
            source["stain_norm"] = self.stain_norm
        return source


def missing_image(job: SlideJob, settings: EmbedSettings) -> SlideResult:
    """The result of an ST section without its H&E image."""
    reason = f"{settings.data}: section {job.slide_id} has no image; add its full-resolution H&E image to the data set"
    LOG.error("%s", reason)
    return SlideResult(job.slide_id, "failed", 0, 0.0, reason)


def slide_failure(job: SlideJob, error: BaseException, seconds: float, store_root: Path) -> SlideResult:
    """The result of a slide whose embedding raised ``error``; re-raises what must stop the whole run.

    A full disk stops the run (every later slide would fail the same way); any other error
    fails this slide only and the summary names it.
    """
    if isinstance(error, DiskFull):
        raise error
    if isinstance(error, EmbedstoreError):
        LOG.error("%s", error)
        return SlideResult(job.slide_id, "failed", 0, seconds, str(error))
    code = disk_full_errno(error)
    if code is not None:  # a full disk met outside the store's writers stops the run too
        raise disk_full(store_root, code, 0) from error
    LOG.error("slide %s failed", job.slide_id, exc_info=error)
    return SlideResult(job.slide_id, "failed", 0, seconds, f"{job.path}: {type(error).__name__}: {error}")


def tile_table(job: SlideJob, slide: Any, target_mpp: float, size_px: int, min_tissue: float) -> pa.Table:
    from embedstore import tiling

    if job.spots is None:
        return tiling.grid_tiles(slide, target_mpp=target_mpp, size_px=size_px, min_tissue=min_tissue)
    spot_ids = job.spots.obs[Col.SPOT_ID].astype(str).tolist()
    return tiling.spot_tiles(
        slide, np.asarray(job.spots.obsm["spatial"]), spot_ids, target_mpp=target_mpp, size_px=size_px
    )


def published_result(job: SlideJob, out: Any, meta: dict, geom: dict, cohort: str) -> SlideResult | None:
    """The result of a slide already done (a valid published file of this encoder and geometry), else None.

    A damaged published file is moved aside (never deleted) and the slide counts as not done;
    staged parts left by a run killed after publishing are cleared; a section whose spots or
    expression file is damaged or missing gets them rewritten without re-embedding.
    """
    try:
        info = out.published_slide(meta["name"], cohort, job.slide_id)
    except DamagedFile as e:
        LOG.warning("%s: %s; moved it to %s and embedding the slide again", e.path, e.problem, out.quarantine(e.path))
        return None
    if info is None:
        return None
    if info.fingerprint != meta["fingerprint"]:
        msg = (
            f"{info.path}: the slide is stored with encoder fingerprint {info.fingerprint}, this run's encoder has "
            f"{meta['fingerprint']}; embed into another store, or use the weights the store was embedded with"
        )
        raise FingerprintMismatch(msg)
    if info.geometry != geom:
        msg = (
            f"{info.path}: the slide is stored tiled at {describe_geometry(info.geometry)}, this run tiles at "
            f"{describe_geometry(geom)}; rerun with --target-mpp {info.geometry['mpp']} --size "
            f"{info.geometry['size_px']}, or embed into another store"
        )
        raise GeometryMismatch(msg)
    out.clear_stale_staging(meta["name"], cohort, job.slide_id)
    damaged = out.damaged_section_files(cohort, job.slide_id) if job.spots is not None else []
    if damaged:
        for path, problem in damaged:
            moved = f"; moved it to {out.quarantine(path)}" if path.exists() else ""
            LOG.warning("%s: %s%s; writing the section's spots and expression again", path, problem, moved)
        out.write_spots_anndata(cohort, job.slide_id, job.spots)
        return SlideResult(job.slide_id, "done", info.num_rows, 0.0, "spots and expression rewritten")
    return SlideResult(job.slide_id, "skipped", 0, 0.0, "already in the store")
