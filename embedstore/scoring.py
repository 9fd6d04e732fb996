"""Score predicted expression against measured expression.

``score_predictions`` turns in-memory AnnData (one per method) into a JSON-able dict of
per-gene Pearson / Spearman / MSE / MAE, aggregated per slide and then over slides;
:data:`DEFINITION` says how each number is computed. ``metrics_table`` reads one statistic
of that dict back as a DataFrame.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore._schema import Col
from embedstore.errors import BadInput
from embedstore.metrics import gene_metrics

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

__all__ = [
    "DEFINITION",
    "STATS",
    "align_rows",
    "gene_index",
    "gene_set_size",
    "gene_set_sizes",
    "metrics_table",
    "paired_gains",
    "score_predictions",
    "spot_keys",
]

LOG = logging.getLogger(__name__)

STATS = ("pearson", "spearman", "mse", "mae")

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


def spot_keys(adata: AnnData, name: str) -> pd.MultiIndex:
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


def gene_index(adata: AnnData, name: str) -> pd.Index:
    """Gene names of ``adata`` as strings; an error naming ``name`` when one is duplicated."""
    genes = adata.var_names.astype(str)
    if genes.has_duplicates:
        msg = f"{name}: gene {genes[genes.duplicated()][0]!r} appears twice in var; call adata.var_names_make_unique()"
        raise BadInput(msg)
    return genes


def align_rows(pred: AnnData, truth_keys: pd.MultiIndex, method: str) -> np.ndarray:
    """Row of ``pred`` for every truth spot, in truth order; an error if any is missing."""
    rows = spot_keys(pred, f"prediction {method!r}").get_indexer(truth_keys)
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
    by_stat: dict[str, list[float]] = {s: [] for s in STATS}
    n_undef = n_undef_sp = 0
    for i, (slide, rows) in enumerate(slide_rows.items()):
        m = gene_metrics(pred[rows], truth[rows])
        gene_pearson[i] = m["pearson"]
        entry: dict[str, Any] = {"n_spots": len(rows)}
        for stat in STATS:
            entry[f"{stat}_mean"] = _num(_mean_defined(m[stat]))
            if entry[f"{stat}_mean"] is not None:
                by_stat[stat].append(entry[f"{stat}_mean"])
        entry["n_undefined"] = int(np.isnan(m["pearson"]).sum())
        entry["n_undefined_spearman"] = int(np.isnan(m["spearman"]).sum())
        n_undef += entry["n_undefined"]
        n_undef_sp += entry["n_undefined_spearman"]
        per_slide[slide] = entry
    out: dict[str, Any] = {}
    for stat in STATS:
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


def gene_set_sizes(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Gene set -> ``{"n_genes", "label"}`` of ``metrics``.

    Metrics written without a ``gene_set_sizes`` entry get sizes from their first method.
    """
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
    truth_keys = spot_keys(truth, "truth")
    truth_genes = gene_index(truth, "truth")
    if gene_sets is None:
        gene_sets = {"all": list(truth_genes)}
    # Deduplicate while keeping the user's order: a gene listed twice must not count twice.
    sets = {str(k): list(dict.fromkeys(str(g) for g in v)) for k, v in gene_sets.items()}
    slide_of = truth_keys.get_level_values(0).to_numpy()
    slide_rows = {s: np.flatnonzero(slide_of == s) for s in dict.fromkeys(slide_of)}
    aligned = {
        str(m): (pred, align_rows(pred, truth_keys, str(m)), gene_index(pred, f"prediction {str(m)!r}"))
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

    if stat not in STATS:
        msg = f"stat {stat!r}: unknown; use one of {', '.join(STATS)}"
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


def paired_gains(metrics: Mapping[str, Any], additions: Sequence[str], stat: str = "pearson") -> dict[str, Any]:
    """The gain of each addition over the same method without it, paired slide by slide.

    A method ``m`` evaluated with an addition ``a`` is named ``"m+a"`` in ``metrics["methods"]``.
    For each such pair and gene set, the difference of the per-slide ``{stat}_mean`` (with minus
    without) is taken on every slide where both are defined: the same slides, folds and genes.

    Returns
    -------
    ``{addition: {method: {gene set: {"mean": d, "se": sd / sqrt(n), "n_slides": n,
    "per_slide": {slide: d}}}}}``; ``se`` is null with fewer than two slides.
    """
    methods = metrics["methods"]
    out: dict[str, Any] = {}
    for addition in additions:
        suffix = f"+{addition}"
        pairs = {m.removesuffix(suffix): m for m in methods if m.endswith(suffix) and m.removesuffix(suffix) in methods}
        for base, variant in pairs.items():
            for gs, without in methods[base]["gene_sets"].items():
                with_ = methods[variant]["gene_sets"][gs]["per_slide"]
                diffs = {
                    slide: with_[slide][f"{stat}_mean"] - entry[f"{stat}_mean"]
                    for slide, entry in without["per_slide"].items()
                    if entry[f"{stat}_mean"] is not None and with_.get(slide, {}).get(f"{stat}_mean") is not None
                }
                d = np.asarray(list(diffs.values()), dtype=np.float64)
                out.setdefault(addition, {}).setdefault(base, {})[gs] = {
                    "mean": _num(d.mean()) if d.size else None,
                    "se": _num(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None,
                    "n_slides": int(d.size),
                    "per_slide": {k: _num(v) for k, v in diffs.items()},
                }
    return out
