"""Score predicted expression against measured expression, and write an HTML report.

``score_predictions`` turns in-memory AnnData (one per method) into a JSON-able dict of
per-gene Pearson / Spearman / MSE / MAE, aggregated per slide and then over slides.
``write_report`` renders that dict, spatial maps of the best-predicted genes over the H&E
thumbnail and the per-gene distribution as a self-contained HTML page with PNG figures
(drawn by :mod:`embedstore._report_plots`, with matplotlib imported lazily).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore import _report_plots as _plots
from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable
from embedstore._schema import OBSM_SPATIAL, Col
from embedstore.errors import BadInput
from embedstore.metrics import gene_metrics

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from PIL import Image

__all__ = [
    "DEFINITION",
    "format_table",
    "gene_set_size",
    "metrics_table",
    "plot_prediction_maps",
    "score_predictions",
    "write_report",
]

LOG = logging.getLogger(__name__)

N_MAP_GENES = 4
REPORT_KIND = "report"
_STATS = ("pearson", "spearman", "mse", "mae")

DEFINITION = (
    "Predictions are matched to the measured spots by (slide_id, spot_id); every measured spot must have a "
    "prediction, and predicted spots without a measurement are ignored. Every method is scored on the same genes: "
    "those of the gene set that are measured and predicted by every method; the others are listed (missing_genes, "
    "n_missing) and left out. n_genes counts the genes scored, and gene_set_sizes gives it once per gene set with "
    "the label that every table and figure shows (its n_genes). Within one slide and for each gene, Pearson r and Spearman rho (Pearson r of average "
    "ranks) are computed across that slide's spots between predicted and measured log-normalised expression; MSE "
    "and MAE are the mean squared and mean absolute differences over those spots. A correlation is undefined when "
    "the prediction or the measurement of that gene is constant over the slide (standard deviation at most 1e-9 "
    "times the largest absolute value); undefined correlations are counted (n_undefined for Pearson, "
    "n_undefined_spearman for Spearman, per slide and summed over slides) and excluded from every mean, never set "
    "to 0. A slide's pearson_mean (likewise spearman_mean, mse_mean, mae_mean) is the mean over the genes with a "
    "defined value on that slide. The overall pearson_mean is the unweighted mean of the per-slide means (each "
    "slide counts once whatever its number of spots; a slide with no defined gene is left out and counted in "
    "n_slides_undefined); pearson_std_over_slides is the sample standard deviation (ddof=1) of the per-slide "
    "means (null with fewer than two slides), and pearson_min_over_slides / pearson_max_over_slides their "
    "extremes; the same holds for spearman, mse and mae. per_gene_pearson is, for each gene, the mean of its "
    "per-slide Pearson r over the slides where it is defined (null when it is defined on none). Null means "
    "undefined."
)


# ----------------------------------------------------------------------------------------------- scoring


def _spot_keys(adata: AnnData, name: str) -> pd.MultiIndex:
    """(slide_id, spot_id) of every row; spot ids fall back to obs_names (the spots readers' layout)."""
    import pandas as pd

    if Col.SLIDE_ID not in adata.obs:
        msg = f"{name}: obs has no {Col.SLIDE_ID!r} column; set adata.obs[{Col.SLIDE_ID!r}] to each spot's slide"
        raise BadInput(msg)
    spots = adata.obs.get(Col.SPOT_ID, adata.obs_names)
    keys = pd.MultiIndex.from_arrays(
        [np.asarray(adata.obs[Col.SLIDE_ID]).astype(str), np.asarray(spots).astype(str)],
        names=[Col.SLIDE_ID, Col.SPOT_ID],
    )
    if keys.has_duplicates:
        dup = keys[keys.duplicated()][0]
        msg = f"{name}: spot {dup[0]}/{dup[1]} appears more than once; keep one row per (slide_id, spot_id)"
        raise BadInput(msg)
    return keys


def _gene_index(adata: AnnData, name: str) -> pd.Index:
    genes = adata.var_names.astype(str)
    if genes.has_duplicates:
        msg = f"{name}: gene {genes[genes.duplicated()][0]!r} appears twice in var; call adata.var_names_make_unique()"
        raise BadInput(msg)
    return genes


def _align(pred: AnnData, truth_keys: pd.MultiIndex, method: str) -> np.ndarray:
    """Row of ``pred`` for every truth spot, in truth order; an error if any is missing."""
    rows = _spot_keys(pred, f"prediction {method!r}").get_indexer(truth_keys)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        eg = truth_keys[missing[0]]
        msg = (
            f"prediction {method!r}: {missing.size} of {len(truth_keys)} measured spots have no prediction "
            f"(e.g. {eg[0]}/{eg[1]}); predict every query spot, or subset the truth to the predicted spots"
        )
        raise BadInput(msg)
    return rows


def _dense(x: Any, rows: np.ndarray | None, cols: np.ndarray, name: str) -> np.ndarray:
    """Rows x columns of a dense or sparse matrix as float64, checked finite."""
    import scipy.sparse as sp

    sub = x[:, cols] if rows is None else x[rows][:, cols]
    out = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float64)
    if not np.isfinite(out).all():
        msg = f"{name}: expression contains NaN or infinite values; fix or drop those spots before scoring"
        raise BadInput(msg)
    return out


def _num(v: float) -> float | None:
    """A JSON number, or None for NaN (JSON has no NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


def _mean_defined(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _score_set(
    pred: np.ndarray, truth: np.ndarray, genes: list[str], missing: list[str], slide_rows: dict[str, np.ndarray]
) -> dict[str, Any]:
    per_slide: dict[str, dict[str, Any]] = {}
    gene_pearson = np.full((len(slide_rows), len(genes)), np.nan)
    by_stat: dict[str, list[float]] = {s: [] for s in _STATS}
    n_undef = n_undef_sp = 0
    for i, (slide, rows) in enumerate(slide_rows.items()):
        m = gene_metrics(pred[rows], truth[rows])
        gene_pearson[i] = m["pearson"]
        entry: dict[str, Any] = {"n_spots": len(rows)}
        for stat in _STATS:
            entry[f"{stat}_mean"] = _num(_mean_defined(m[stat]))
            if entry[f"{stat}_mean"] is not None:
                by_stat[stat].append(entry[f"{stat}_mean"])
        entry["n_undefined"] = int(np.isnan(m["pearson"]).sum())
        entry["n_undefined_spearman"] = int(np.isnan(m["spearman"]).sum())
        n_undef += entry["n_undefined"]
        n_undef_sp += entry["n_undefined_spearman"]
        per_slide[slide] = entry
    out: dict[str, Any] = {}
    for stat in _STATS:
        v = np.asarray(by_stat[stat])
        out[f"{stat}_mean"] = _num(v.mean()) if v.size else None
        out[f"{stat}_std_over_slides"] = _num(v.std(ddof=1)) if v.size > 1 else None
        out[f"{stat}_min_over_slides"] = _num(v.min()) if v.size else None
        out[f"{stat}_max_over_slides"] = _num(v.max()) if v.size else None
    defined = np.isfinite(gene_pearson)
    per_gene = np.where(defined, gene_pearson, 0.0).sum(axis=0) / np.maximum(defined.sum(axis=0), 1)
    per_gene[~defined.any(axis=0)] = np.nan
    out.update(
        n_genes=len(genes),
        n_undefined=n_undef,
        n_undefined_spearman=n_undef_sp,
        n_missing=len(missing),
        missing_genes=missing,
        n_slides=len(slide_rows),
        n_slides_undefined=len(slide_rows) - len(by_stat["pearson"]),
        n_spots=int(sum(len(r) for r in slide_rows.values())),
        per_slide=per_slide,
        per_gene_pearson={g: _num(v) for g, v in zip(genes, per_gene, strict=True)},
    )
    return out


def gene_set_size(name: str, per_fold: Sequence[int], shared: int) -> dict[str, Any]:
    """The size of a gene set, as every table, report and figure shows it.

    Parameters
    ----------
    name
        Gene-set name.
    per_fold
        Genes scored in each fold (one number outside cross-validation).
    shared
        Genes scored in every fold (the per-gene numbers and figures cover these).

    Returns
    -------
    ``{"n_genes": shared, "label": ...}``, e.g. ``"hvg50 (50 genes)"`` or, when folds chose
    their own sets, ``"hvg50 (50 genes per fold, 48 in every fold)"``.
    """
    lo, hi = min(per_fold, default=shared), max(per_fold, default=shared)
    if lo == hi == shared:
        label = f"{name} ({shared} genes)"
    else:
        each = str(lo) if lo == hi else f"{lo}–{hi}"
        label = f"{name} ({each} genes per fold, {shared} in every fold)"
    return {"n_genes": shared, "label": label}


def _sizes(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``gene_set_sizes`` of the metrics; derived from the first method for metrics written before it existed."""
    if "gene_set_sizes" in metrics:
        return metrics["gene_set_sizes"]
    first = next(iter(metrics["methods"].values()), {"gene_sets": {}})["gene_sets"]
    return {
        gs: gene_set_size(gs, [], int(first.get(gs, {}).get("n_genes", len(genes))))
        for gs, genes in metrics["gene_sets"].items()
    }


def score_predictions(
    predictions: Mapping[str, AnnData], truth: AnnData, gene_sets: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """Score each method's predicted expression against the measured expression.

    Parameters
    ----------
    predictions
        Method name -> AnnData of predicted log-normalised expression (obs ``slide_id``
        and ``spot_id``, var index = genes). Extra predicted spots are ignored.
    truth
        AnnData of measured log-normalised expression, X dense or sparse, obs ``slide_id``
        and ``spot_id`` (obs_names when the column is absent), var index = genes.
    gene_sets
        Gene-set name -> genes; ``None`` scores every gene of ``truth`` as the set ``"all"``.

    Returns
    -------
    A JSON-able dict ``{"methods": {method: {"gene_sets": {set: {...}}}}, "gene_sets": {...},
    "gene_set_sizes": {set: {"n_genes", "label"}}, "definition": str}``; :data:`DEFINITION`
    says how each number is computed. ``None`` stands for an undefined value.

    Raises
    ------
    BadInput
        A measured spot has no prediction (message names the method and the count), ids or
        genes are duplicated, obs lacks ``slide_id``, or values are not finite.
    """
    if not predictions:
        msg = "predictions: no method given; pass {method name: AnnData}"
        raise BadInput(msg)
    truth_keys = _spot_keys(truth, "truth")
    truth_genes = _gene_index(truth, "truth")
    if gene_sets is None:
        gene_sets = {"all": list(truth_genes)}
    # Deduplicate while keeping the user's order: a gene listed twice must not count twice.
    sets = {str(k): list(dict.fromkeys(str(g) for g in v)) for k, v in gene_sets.items()}
    slide_of = truth_keys.get_level_values(0).to_numpy()
    slide_rows = {s: np.flatnonzero(slide_of == s) for s in dict.fromkeys(slide_of)}
    aligned = {
        str(m): (pred, _align(pred, truth_keys, str(m)), _gene_index(pred, f"prediction {str(m)!r}"))
        for m, pred in predictions.items()
    }
    # One set of genes per gene set for every method: a method that predicts fewer genes
    # must not be compared with the others on a different (easier or harder) set.
    scorable = set(truth_genes).intersection(*(set(genes) for _, _, genes in aligned.values()))
    used = {name: [g for g in genes if g in scorable] for name, genes in sets.items()}
    missing = {name: [g for g in genes if g not in scorable] for name, genes in sets.items()}
    for name, genes in sets.items():
        if missing[name]:
            LOG.info("%s: %d of %d genes not measured or not predicted by every method, left out",
                     name, len(missing[name]), len(genes))  # fmt: skip
    truth_x = {name: _dense(truth.X, None, truth_genes.get_indexer(g), "truth") for name, g in used.items()}
    methods: dict[str, Any] = {}
    for method, (pred, rows, pred_genes) in aligned.items():
        scored: dict[str, Any] = {}
        for name in sets:
            p = _dense(pred.X, rows, pred_genes.get_indexer(used[name]), f"prediction {method!r}")
            scored[name] = _score_set(p, truth_x[name], used[name], missing[name], slide_rows)
        methods[method] = {"gene_sets": scored}
    sizes = {name: gene_set_size(name, [len(g)], len(g)) for name, g in used.items()}
    return {"methods": methods, "gene_sets": sets, "gene_set_sizes": sizes, "definition": DEFINITION}


# ------------------------------------------------------------------------------------------------ tables


def metrics_table(metrics: Mapping[str, Any], stat: str = "pearson") -> pd.DataFrame:
    """Methods x gene sets: mean and standard deviation over slides of one statistic.

    Parameters
    ----------
    metrics
        Output of :func:`score_predictions`.
    stat
        ``"pearson"``, ``"spearman"``, ``"mse"`` or ``"mae"``.

    Returns
    -------
    DataFrame indexed by method with columns ``(gene set, "mean" | "std")``; NaN = undefined.
    """
    import pandas as pd

    if stat not in _STATS:
        msg = f"stat {stat!r}: unknown; use one of {', '.join(_STATS)}"
        raise BadInput(msg)
    sets = list(metrics["gene_sets"])
    cols = pd.MultiIndex.from_product([sets, ["mean", "std"]], names=["gene_set", "stat"])
    rows = []
    for res in metrics["methods"].values():
        row = []
        for gs in sets:
            g = res["gene_sets"][gs]
            row += [g[f"{stat}_mean"], g[f"{stat}_std_over_slides"]]
        rows.append([np.nan if v is None else v for v in row])
    return pd.DataFrame(rows, index=pd.Index(list(metrics["methods"]), name="method"), columns=cols, dtype=float)


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
    sizes = _sizes(metrics)
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
    return "\n".join(out)


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
    var = _gene_index(adata, "prediction")
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


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "slide"


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


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f2f2f2}img{max-width:100%}
.notes{background:#fff8e1;border-left:4px solid #f0b400;padding:.3em 1em}.small{color:#555;font-size:.9em}"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are pre-escaped HTML strings."""
    h = "".join(f"<th>{c}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


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
    """Write ``out_dir/report.html`` and its figures in ``out_dir/figures/``.

    Each file is written atomically and stamped as embedstore's (``embedstore.kind`` meta tag,
    PNG text chunk); an existing ``report.html`` or figure that embedstore did not write is
    refused (:class:`~embedstore.errors.BadInput`), untouched.

    Parameters
    ----------
    out_dir
        Output folder (created).
    metrics
        Output of :func:`score_predictions` for the same ``predictions`` and ``truth``.
    predictions, truth
        As given to :func:`score_predictions`; used for the spatial maps.
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
    out = Path(out_dir)
    fig_dir = out / "figures"
    check_replaceable(out / "report.html", REPORT_KIND, what="report (.html)", option="out_dir")
    esc = html.escape
    sets = list(metrics["gene_sets"])
    methods = list(metrics["methods"])
    gene_set = gene_set or (sets[0] if sets else None)
    if gene_set is not None and gene_set not in metrics["gene_sets"]:
        msg = f"gene set {gene_set!r}: not in metrics; use one of {', '.join(sets)}"
        raise BadInput(msg)
    first = metrics["methods"][methods[0]]["gene_sets"] if methods else {}

    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='{KIND_KEY}' content='{REPORT_KIND}'>"
    ]
    if run:
        parts.append(f"<meta name='embedstore.run' content='{esc(run)}'>")
    parts.append(f"<title>{esc(title)}</title>")
    parts.append(f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>")
    n_slides = first[gene_set]["n_slides"] if gene_set else 0
    n_spots = first[gene_set]["n_spots"] if gene_set else 0
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f"<p class='small'>{len(methods)} methods, {n_spots} measured spots on {n_slides} slides; written {stamp}.</p>"
    )
    if notes:
        parts.append("<div class='notes'><h2>Notes</h2>" + "".join(f"<p>{esc(n)}</p>" for n in notes) + "</div>")

    # (a) methods x gene sets, best mean per column in bold.
    table = metrics_table(metrics)
    sizes = _sizes(metrics)
    head = ["method"] + [esc(sizes[gs]["label"]) for gs in sets]
    rows = []
    for m in methods:
        row = [esc(m)]
        for gs in sets:
            cell = esc(_pm(table.loc[m, (gs, "mean")], table.loc[m, (gs, "std")]))
            row.append(f"<b>{cell}</b>" if _best(table, gs) == m else cell)
        rows.append(row)
    parts.append("<h2>Pearson r per gene (mean ± SD over slides)</h2>" + _html_table(head, rows))
    parts.append("<p class='small'>Bold: best mean in the column. SD is the spread of per-slide means.</p>")
    cov_head = ["method", "gene set", "genes left out", "undefined r (gene × slide)", "Spearman", "MSE"]
    cov = []
    for m in methods:
        for gs in sets:
            g = metrics["methods"][m]["gene_sets"][gs]
            sp = "undefined" if g["spearman_mean"] is None else f"{g['spearman_mean']:.3f}"
            mse = "undefined" if g["mse_mean"] is None else f"{g['mse_mean']:.4g}"
            label = esc(sizes[gs]["label"])
            cov.append([esc(m), label, str(g["n_missing"]), str(g["n_undefined"]), sp, esc(mse)])
    parts.append("<h3>Coverage and other metrics</h3>" + _html_table(cov_head, cov))

    # (c) distribution of per-gene correlation.
    if sets and methods:
        _plots.plot_distribution(fig_dir / "pearson_per_gene.png", metrics, {gs: sizes[gs]["label"] for gs in sets})
        parts.append("<h2>Per-gene correlation</h2><img src='figures/pearson_per_gene.png' alt='per-gene Pearson r'>")

    # (b) maps of the best-predicted genes, per slide.
    best, genes = _top_genes(metrics, gene_set) if gene_set else (None, [])
    if genes:
        parts.append(
            f"<h2>Best-predicted genes</h2><p>The {len(genes)} genes with the highest Pearson r of the best method "
            f"(<b>{esc(best)}</b> on <i>{esc(sizes[gene_set]['label'])}</i>): {esc(', '.join(genes))}. "
            "Each panel has its own "
            "colour scale (1st–99th percentile), since correlation ignores scale.</p>"
        )
        truth_keys = _spot_keys(truth, "truth")
        slide_of = truth_keys.get_level_values(0).to_numpy()
        # Align once; every slide's panels index into these rows.
        sources = [("measured", truth, np.arange(truth.n_obs), _gene_index(truth, "truth"))]
        for m, p in predictions.items():
            sources.append((m, p, _align(p, truth_keys, m), _gene_index(p, f"prediction {m!r}")))
        if OBSM_SPATIAL in truth.obsm:
            xy0 = _plots.spatial(truth, "truth")
        else:  # spot-centred predictions carry the same centres
            xy0 = _plots.spatial(sources[1][1], f"prediction {sources[1][0]!r}")[sources[1][2]]
        for s in list(dict.fromkeys(slide_of))[:max_map_slides]:
            sel = np.flatnonzero(slide_of == s)
            cols = [(label, ad, rows[sel], var) for label, ad, rows, var in sources]
            name = f"maps_{_slug(s)}.png"
            _plots.plot_slide_maps(fig_dir / name, s, genes, cols, xy0[sel], thumbnails)
            parts.append(f"<h3>{esc(s)}</h3><img src='figures/{esc(name)}' alt='maps of slide {esc(s)}'>")
    else:
        parts.append("<h2>Best-predicted genes</h2><p>No method has a defined correlation; no maps.</p>")

    # Per-slide numbers, folded (plain <details>, no JavaScript).
    parts.append("<h2>Per slide</h2>")
    for gs in sets:
        slides_gs = list(first[gs]["per_slide"])
        srows = []
        for s in slides_gs:
            row = [esc(s), str(first[gs]["per_slide"][s]["n_spots"])]
            for m in methods:
                e = metrics["methods"][m]["gene_sets"][gs]["per_slide"][s]
                r = "undefined" if e["pearson_mean"] is None else f"{e['pearson_mean']:.3f}"
                row.append(f"{r} ({e['n_undefined']})")
            srows.append(row)
        parts.append(
            f"<details><summary>{esc(gs)}: Pearson r mean per slide (undefined genes)</summary>"
            + _html_table(["slide", "spots", *map(esc, methods)], srows)
            + "</details>"
        )

    parts.append(f"<h2>How the numbers are computed</h2><p>{esc(metrics.get('definition', DEFINITION))}</p>")
    parts.append("<h2>Gene sets</h2>")
    for gs in sets:
        scored = list(first[gs]["per_gene_pearson"]) if gs in first else metrics["gene_sets"][gs]
        parts.append(f"<details><summary>{esc(sizes[gs]['label'])}</summary><p>{esc(', '.join(scored))}</p>")
        missing = {g for m in methods for g in metrics["methods"][m]["gene_sets"][gs]["missing_genes"]}
        if missing:
            left_out = esc(", ".join(sorted(missing)))
            parts.append(f"<p>Left out (not measured, or not predicted by every method): {left_out}</p>")
        if "n_genes_per_fold" in sizes[gs]:
            parts.append("<p>Each fold's own set is listed in metrics.json (fold_gene_sets).</p>")
        parts.append("</details>")
    parts.append("</body></html>\n")

    path = out / "report.html"
    with atomic_file(path) as tmp:
        tmp.write_text("".join(parts), encoding="utf-8")
    return path
