"""Present scored predictions: a plain-text table, prediction maps and the HTML report.

``format_table`` prints the metrics of :func:`embedstore.scoring.score_predictions` for the
terminal. ``write_report`` renders them, spatial maps of the best-predicted genes over the H&E
thumbnail and the per-gene distribution into one self-contained HTML page (Jinja2 template
``templates/report.html.j2``, figures drawn by :mod:`embedstore._report_plots` and embedded
as data: URIs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore import _report_plots as _plots
from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable
from embedstore._schema import OBSM_SPATIAL, Col
from embedstore.errors import BadInput
from embedstore.scoring import DEFINITION, align_rows, gene_index, gene_set_sizes, metrics_table, spot_keys

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from PIL import Image

__all__ = ["format_table", "plot_prediction_maps", "write_report"]

N_MAP_GENES = 4
REPORT_KIND = "report"

# ------------------------------------------------------------------------------------------------ tables


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "undefined"
    return f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"


def _best(table: pd.DataFrame, gs: str) -> str | None:
    col = table[(gs, "mean")]
    return None if col.isna().all() else str(col.idxmax())


def format_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal: Pearson r per gene, mean ± SD over slides, best marked ``*``."""
    table = metrics_table(metrics)
    sets = list(metrics["gene_sets"])
    first = next(iter(metrics["methods"].values()))["gene_sets"]
    sizes = gene_set_sizes(metrics)
    head = ["method"] + [sizes[gs]["label"] for gs in sets]
    body = []
    for method in table.index:
        cells = [str(method)]
        for gs in sets:
            mark = " *" if _best(table, gs) == method else ""
            cells.append(_pm(table.loc[method, (gs, "mean")], table.loc[method, (gs, "std")]) + mark)
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    n_slides = first[sets[0]]["n_slides"] if sets else 0
    out = [f"Pearson r per gene, mean ± SD over {n_slides} slides (* = best)", line(head)]
    out += ["  ".join("-" * w for w in widths), *(line(r) for r in body)]
    for method, res in metrics["methods"].items():
        for gs in sets:
            g = res["gene_sets"][gs]
            if g["n_undefined"] or g["n_missing"]:
                out.append(
                    f"{method} / {gs}: {g['n_undefined']} undefined gene-slide correlations excluded, "
                    f"{g['n_missing']} genes missing"
                )
    out += format_gains(metrics)
    return "\n".join(out)


def format_gains(metrics: Mapping[str, Any]) -> list[str]:
    """One line per addition and method: its paired gain in Pearson r per gene set, mean ± SE over slides."""
    lines = []
    for addition, by_method in metrics.get("gains", {}).items():
        for method, sets in by_method.items():
            cells = [
                f"{gs} {g['mean']:+.3f} ± {g['se']:.3f}" if g["se"] is not None else f"{gs} {g['mean']:+.3f}"
                for gs, g in sets.items()
                if g["mean"] is not None
            ]
            n = max((g["n_slides"] for g in sets.values()), default=0)
            lines.append(f"gain of +{addition} for {method} (paired over {n} slides, mean ± SE): {', '.join(cells)}")
    return lines


# ------------------------------------------------------------------------------------------------- plots


def plot_prediction_maps(
    adata: AnnData, thumbnail: Image.Image | None, scale: float, genes: Sequence[str], path: str | Path
) -> Path:
    """Predicted expression maps of a few genes over one slide's H&E thumbnail.

    Parameters
    ----------
    adata
        Prediction of one slide: X = predicted expression, var = genes,
        ``obsm['spatial']`` = level-0 pixel centres (x = column, y = row).
    thumbnail
        PIL thumbnail of the slide, or ``None`` for maps without the H&E.
    scale
        Thumbnail pixels per level-0 pixel.
    genes
        Genes to draw, one panel each (up to four panels per row).
    path
        PNG file to write.

    Returns
    -------
    The path written.
    """
    genes = [str(g) for g in genes]
    if not genes:
        msg = "plot_prediction_maps: no gene given; pass the genes to draw"
        raise BadInput(msg)
    var = gene_index(adata, "prediction")
    absent = [g for g in genes if g not in var]
    if absent:
        msg = f"prediction: genes not predicted: {', '.join(absent[:10])}; pick genes from adata.var_names"
        raise BadInput(msg)
    if Col.SLIDE_ID in adata.obs and adata.obs[Col.SLIDE_ID].nunique() > 1:
        msg = "prediction: spots of several slides; subset adata to one slide_id, the thumbnail shows one slide"
        raise BadInput(msg)
    img = None if thumbnail is None else np.asarray(thumbnail.convert("RGB"))
    xy = _plots.spatial(adata, "prediction") * float(scale)
    ncol = min(len(genes), 4)
    nrow = -(-len(genes) // ncol)
    fig = _plots.new_figure(3.4 * ncol, 3.2 * nrow, layout=None)
    axes = fig.subplots(nrow, ncol, squeeze=False, gridspec_kw=_plots.map_grid(3.2 * nrow)).ravel()
    rows = np.arange(adata.n_obs)
    for ax, g in zip(axes, genes, strict=False):
        _plots.draw_map(ax, img, xy, _plots.column(adata.X, rows, var.get_loc(g)), f"{g} (predicted)")
    for ax in axes[len(genes) :]:
        ax.set_axis_off()
    return _plots.save_png(fig, Path(path))


# ------------------------------------------------------------------------------------------------ report


def _top_genes(metrics: Mapping[str, Any], gene_set: str) -> tuple[str | None, list[str]]:
    """Best method on ``gene_set`` (highest pearson_mean) and its N_MAP_GENES best-predicted genes."""
    scores = {m: r["gene_sets"][gene_set]["pearson_mean"] for m, r in metrics["methods"].items()}
    scores = {m: v for m, v in scores.items() if v is not None}
    if not scores:
        return None, []
    best = max(scores, key=scores.__getitem__)
    per_gene = metrics["methods"][best]["gene_sets"][gene_set]["per_gene_pearson"]
    ranked = sorted((v, g) for g, v in per_gene.items() if v is not None)
    return best, [g for _, g in reversed(ranked[-N_MAP_GENES:])]


def _mapped(predictions: Mapping[str, AnnData], best: str | None) -> dict[str, AnnData]:
    """The methods drawn on the maps: every method without an addition (``m+context``...), and the best one."""
    return {m: p for m, p in predictions.items() if "+" not in m or m == best}


def _slide_maps(
    genes: list[str],
    predictions: Mapping[str, AnnData],
    truth: AnnData,
    thumbnails: Mapping[str, tuple[Image.Image, float]] | None,
    max_slides: int | None,
) -> list[dict[str, str]]:
    """Per slide (at most ``max_slides``): measured and predicted maps of ``genes``, as a JPEG data: URI."""
    truth_keys = spot_keys(truth, "truth")
    slide_of = truth_keys.get_level_values(0).to_numpy()
    # Align once; every slide's panels index into these rows.
    sources = [("measured", truth, np.arange(truth.n_obs), gene_index(truth, "truth"))]
    for m, p in predictions.items():
        sources.append((m, p, align_rows(p, truth_keys, m), gene_index(p, f"prediction {m!r}")))
    if OBSM_SPATIAL in truth.obsm:
        xy0 = _plots.spatial(truth, "truth")
    else:  # spot-centred predictions carry the same centres
        xy0 = _plots.spatial(sources[1][1], f"prediction {sources[1][0]!r}")[sources[1][2]]
    maps = []
    for s in list(dict.fromkeys(slide_of))[:max_slides]:
        sel = np.flatnonzero(slide_of == s)
        cols = [(label, ad, rows[sel], var) for label, ad, rows, var in sources]
        fig = _plots.plot_slide_maps(s, genes, cols, xy0[sel], thumbnails)
        maps.append({"slide": s, "src": _plots.data_uri(fig, "jpeg")})
    return maps


def _summary_rows(metrics: Mapping[str, Any], sets: list[str]) -> list[dict[str, Any]]:
    """Methods x gene sets, Pearson mean ± SD over slides, the best mean per column flagged."""
    table = metrics_table(metrics)
    best = {gs: _best(table, gs) for gs in sets}
    return [
        {
            "method": m,
            "cells": [
                {"text": _pm(table.loc[m, (gs, "mean")], table.loc[m, (gs, "std")]), "best": best[gs] == m}
                for gs in sets
            ],
        }
        for m in table.index
    ]


def _coverage_rows(metrics: Mapping[str, Any], sets: list[str], labels: Mapping[str, str]) -> list[list[str]]:
    """Per method and gene set: genes left out, undefined correlations, Spearman and MSE."""
    rows = []
    for m, res in metrics["methods"].items():
        for gs in sets:
            g = res["gene_sets"][gs]
            sp = "undefined" if g["spearman_mean"] is None else f"{g['spearman_mean']:.3f}"
            mse = "undefined" if g["mse_mean"] is None else f"{g['mse_mean']:.4g}"
            rows.append([m, labels[gs], str(g["n_missing"]), str(g["n_undefined"]), sp, mse])
    return rows


def _per_slide_rows(metrics: Mapping[str, Any], gs: str) -> list[list[str]]:
    """Per slide of ``gs``: spots, then each method's Pearson mean (undefined genes)."""
    first = next(iter(metrics["methods"].values()))["gene_sets"][gs]["per_slide"]
    rows = []
    for s, entry in first.items():
        row = [s, str(entry["n_spots"])]
        for res in metrics["methods"].values():
            e = res["gene_sets"][gs]["per_slide"][s]
            r = "undefined" if e["pearson_mean"] is None else f"{e['pearson_mean']:.3f}"
            row.append(f"{r} ({e['n_undefined']})")
        rows.append(row)
    return rows


def _gene_set_entries(
    metrics: Mapping[str, Any], sets: list[str], sizes: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per gene set: its label, the genes scored, the genes left out, whether folds chose their own."""
    methods = list(metrics["methods"].values())
    first = methods[0]["gene_sets"] if methods else {}
    return [
        {
            "label": sizes[gs]["label"],
            "scored": list(first[gs]["per_gene_pearson"]) if gs in first else metrics["gene_sets"][gs],
            "left_out": sorted({g for res in methods for g in res["gene_sets"][gs]["missing_genes"]}),
            "per_fold": "n_genes_per_fold" in sizes[gs],
        }
        for gs in sets
    ]


def _render(context: Mapping[str, Any]) -> str:
    """``report.html`` from the packaged template; every value is HTML-escaped."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("embedstore", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(context)


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    predictions: Mapping[str, AnnData],
    truth: AnnData,
    thumbnails: Mapping[str, tuple[Image.Image, float]] | None,
    title: str,
    notes: Sequence[str] = (),
    *,
    gene_set: str | None = None,
    max_map_slides: int | None = None,
    run: str | None = None,
) -> Path:
    """Write ``out_dir/report.html``: one self-contained page, its figures embedded as data: URIs.

    The page references no other file (no linked image, stylesheet, script or font), so it
    can be mailed or moved on its own. It is written atomically and stamped as embedstore's
    (``embedstore.kind`` meta tag); an existing ``report.html`` that embedstore did not write
    is refused (:class:`~embedstore.errors.BadInput`), untouched.

    Parameters
    ----------
    out_dir
        Output folder (created).
    metrics
        Output of :func:`~embedstore.scoring.score_predictions` for the same ``predictions`` and ``truth``.
    predictions, truth
        As given to :func:`~embedstore.scoring.score_predictions`; used for the spatial maps.
    thumbnails
        slide_id -> (PIL thumbnail, thumbnail pixels per level-0 pixel); a slide without
        one is mapped without the H&E.
    title
        Page title.
    notes
        Paragraphs shown near the top (caveats such as "section-level folds: one patient").
    gene_set
        Gene set that picks the best method and its top genes for the maps (default: the first).
    max_map_slides
        Draw maps for at most this many slides (default: all).
    run
        Id of the evaluation run, stamped into the page (``embedstore.run`` meta tag).

    Returns
    -------
    Path of ``report.html``.
    """
    path = Path(out_dir) / "report.html"
    check_replaceable(path, REPORT_KIND, what="report (.html)", option="out_dir")
    sets = list(metrics["gene_sets"])
    methods = list(metrics["methods"])
    gene_set = gene_set or (sets[0] if sets else None)
    if gene_set is not None and gene_set not in metrics["gene_sets"]:
        msg = f"gene set {gene_set!r}: not in metrics; use one of {', '.join(sets)}"
        raise BadInput(msg)
    sizes = gene_set_sizes(metrics)
    labels = {gs: sizes[gs]["label"] for gs in sets}
    first = metrics["methods"][methods[0]]["gene_sets"][gene_set] if methods and gene_set else None
    best, genes = _top_genes(metrics, gene_set) if gene_set else (None, [])
    context = {
        "kind_key": KIND_KEY,
        "kind": REPORT_KIND,
        "run": run,
        "title": title,
        "n_methods": len(methods),
        "n_spots": first["n_spots"] if first else 0,
        "n_slides": first["n_slides"] if first else 0,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": list(notes),
        "methods": methods,
        "set_labels": [labels[gs] for gs in sets],
        "summary": _summary_rows(metrics, sets),
        "coverage": _coverage_rows(metrics, sets, labels),
        "distribution": (
            _plots.data_uri(_plots.plot_distribution(metrics, labels), "png") if sets and methods else None
        ),
        "best_method": best,
        "map_gene_set": labels.get(gene_set, ""),
        "map_genes": genes,
        "maps": _slide_maps(genes, _mapped(predictions, best), truth, thumbnails, max_map_slides) if genes else [],
        "per_slide": [{"gene_set": gs, "rows": _per_slide_rows(metrics, gs)} for gs in sets] if methods else [],
        "definition": metrics.get("definition", DEFINITION),
        "gene_sets": _gene_set_entries(metrics, sets, sizes),
    }
    page = _render(context).encode("utf-8")
    with atomic_file(path, size_hint=len(page)) as tmp:
        tmp.write_bytes(page)
    return path
