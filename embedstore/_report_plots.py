"""Figures of the evaluation report: spot maps over an H&E thumbnail, per-gene distributions.

Private to :mod:`embedstore.report`. matplotlib's object API on an Agg canvas (no pyplot),
so a user's interactive backend is never switched and nothing is shown on screen; matplotlib
is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable
from embedstore._schema import OBSM_SPATIAL
from embedstore.errors import BadInput

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

LOG = logging.getLogger(__name__)


def new_figure(w: float, h: float, layout: str | None = "constrained") -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout=layout)
    FigureCanvasAgg(fig)
    return fig


FIGURE_KIND = "figure"


def figure_bytes(fig: Any, fmt: str = "png") -> bytes:
    """The figure encoded as ``fmt``.

    ``"png"`` (lossless, for line art) carries an ``embedstore.kind`` text chunk; ``"jpeg"``
    (quality 85) keeps maps over an H&E thumbnail about four times smaller.
    """
    buf = io.BytesIO()
    if fmt == "png":
        fig.savefig(buf, format="png", dpi=100, metadata={KIND_KEY: FIGURE_KIND})
    else:
        fig.savefig(buf, format=fmt, dpi=100, pil_kwargs={"quality": 85, "optimize": True})
    return buf.getvalue()


def data_uri(fig: Any, fmt: str = "png") -> str:
    """The figure as a ``data:image/<fmt>;base64,...`` URI, to embed in a page."""
    return f"data:image/{fmt};base64," + base64.b64encode(figure_bytes(fig, fmt)).decode("ascii")


def save_png(fig: Any, path: Path) -> Path:
    """Write a PNG atomically, stamped with an ``embedstore.kind`` text chunk.

    An existing file is replaced only when it is an embedstore figure; readers never see a
    half-written one.
    """
    check_replaceable(path, FIGURE_KIND, what="figure (.png)", option="path")
    data = figure_bytes(fig)
    with atomic_file(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def map_grid(height_in: float) -> dict[str, float]:
    """Fixed margins (no layout engine) with room for titles and the inset colour bars."""
    return {"left": 0.02, "right": 0.92, "bottom": 0.1 / height_in, "top": 1 - 0.6 / height_in, "wspace": 0.35}


def spot_diameter(xy: np.ndarray) -> float:
    """Display diameter: 0.9 x the median nearest-neighbour distance, so the lattice reads as a map."""
    if len(xy) < 2:
        return 10.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    nn = float(np.median(d[:, 1]))
    return 0.9 * nn if nn > 0 else 10.0


def draw_map(ax: Any, img: np.ndarray | None, xy: np.ndarray, values: np.ndarray | None, title: str) -> None:
    """Spots as circles (diameter in thumbnail px) over the thumbnail, coloured by ``values``."""
    from matplotlib import colormaps
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    d = spot_diameter(xy)
    if img is not None:
        ax.imshow(img)
    ax.set_aspect("equal")
    lo, hi = xy.min(axis=0) - d, xy.max(axis=0) + d
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # image rows grow downwards
    if values is None:
        ax.text(0.5, 0.5, "not predicted", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        return
    # Per-panel 1st-99th percentile scale: correlation is scale-free, so the pattern is what matters.
    vmin, vmax = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    coll = EllipseCollection(
        d, d, 0.0, units="xy", offsets=xy, offset_transform=ax.transData, cmap=colormaps["viridis"]
    )
    coll.set_norm(Normalize(vmin, vmax))
    coll.set_array(np.asarray(values, dtype=float))
    coll.set_alpha(0.9)
    ax.add_collection(coll)
    # An inset colour bar needs no layout engine, which costs seconds on grids of maps.
    cax = ax.inset_axes((1.02, 0.0, 0.04, 1.0))
    ax.figure.colorbar(coll, cax=cax).ax.tick_params(labelsize=7)


def thumbnail_xy(thumbnails: Mapping[str, Any] | None, slide: str, xy_level0: np.ndarray) -> tuple[Any, np.ndarray]:
    """Thumbnail as an RGB array (or None) and the spot centres in thumbnail pixels."""
    if thumbnails and slide in thumbnails:
        image, scale = thumbnails[slide]
        return np.asarray(image.convert("RGB")), np.asarray(xy_level0, dtype=float) * float(scale)
    if thumbnails:  # some slides have one: a missing one is worth a warning
        LOG.warning("slide %s: no thumbnail, maps drawn without H&E", slide)
    return None, np.asarray(xy_level0, dtype=float)


def column(x: Any, rows: np.ndarray, col: int) -> np.ndarray:
    """One column of a dense or sparse matrix at ``rows``, as float64."""
    import scipy.sparse as sp

    v = x[rows][:, [col]]
    return np.asarray(v.toarray() if sp.issparse(v) else v, dtype=float).ravel()


def spatial(adata: AnnData, name: str) -> np.ndarray:
    """Level-0 spot centres (x, y) from ``obsm['spatial']``; a clear error when absent."""
    if OBSM_SPATIAL not in adata.obsm:
        msg = f"{name}: obsm[{OBSM_SPATIAL!r}] is missing; spot centres (level-0 px, x=col, y=row) are needed to plot"
        raise BadInput(msg)
    return np.asarray(adata.obsm[OBSM_SPATIAL], dtype=float)[:, :2]


def plot_slide_maps(
    slide: str,
    genes: list[str],
    columns: list[tuple[str, AnnData, np.ndarray, pd.Index]],
    xy_level0: np.ndarray,
    thumbnails: Mapping[str, Any] | None,
) -> Any:
    """A figure: one row per gene, one column per source (measured, then each method), on the slide's thumbnail."""
    img, xy = thumbnail_xy(thumbnails, slide, xy_level0)
    height = 3.0 * len(genes) + 0.4
    fig = new_figure(3.2 * len(columns), height, layout=None)
    axes = fig.subplots(len(genes), len(columns), squeeze=False, gridspec_kw=map_grid(height))
    for i, g in enumerate(genes):
        for j, (label, ad, rows, var) in enumerate(columns):
            vals = column(ad.X, rows, var.get_loc(g)) if g in var else None
            draw_map(axes[i, j], img, xy, vals, f"{g}: {label}")
    fig.suptitle(f"slide {slide}", fontsize=11)
    return fig


def plot_distribution(metrics: Mapping[str, Any], labels: Mapping[str, str]) -> Any:
    """A figure: per gene set, a box per method of the per-gene Pearson r (mean over slides), points overlaid.

    ``labels`` titles each gene set's panel (its name and size, as the tables show it).
    """
    sets = list(metrics["gene_sets"])
    methods = list(metrics["methods"])
    fig = new_figure(max(4.5, (1.2 + 0.7 * len(methods)) * len(sets)), 4.2)
    axes = fig.subplots(1, max(len(sets), 1), squeeze=False).ravel()
    rng = np.random.default_rng(0)  # fixed jitter: the same metrics draw the same figure
    for ax, gs in zip(axes, sets, strict=False):
        ticks = []
        for k, m in enumerate(methods):
            per_gene = metrics["methods"][m]["gene_sets"][gs]["per_gene_pearson"]
            v = np.array([x for x in per_gene.values() if x is not None], dtype=float)
            # The size is in the title; a method's tick says only how many of those genes have no r.
            undefined = len(per_gene) - v.size
            ticks.append(f"{m}\n({undefined} undefined)" if undefined else m)
            if v.size:
                ax.boxplot([v], positions=[k], widths=0.6, showfliers=False)
                ax.scatter(k + rng.uniform(-0.2, 0.2, v.size), v, s=12, alpha=0.6, color="tab:blue", lw=0, zorder=3)
        ax.set_xticks(range(len(methods)), ticks, fontsize=8, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_ylabel("Pearson r per gene (mean over slides)", fontsize=8)
        ax.set_title(labels.get(gs, gs), fontsize=10)
    return fig
