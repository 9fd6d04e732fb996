"""The evaluation stage: every method on the same embeddings, genes and leakage-free splits.

``evaluate`` embeds a reference and a query ST data set (or cross-validates one data set by
patient, or by section when it has one patient), builds what each method needs from the
reference only (gene panel and gene sets, ridge probe, raw-embedding index, aligner,
aligned index, learned aggregator), predicts the query, and writes
``predictions_<method>.h5ad``, ``metrics.json`` and ``report.html``. ``demo`` runs it offline
on a synthetic cohort.

The output folder is marked by ``evaluation.json`` (``embedstore.kind = "evaluation"``, the run id
and the files of the run). A run is written into a temporary folder and published file by file
only once complete; every file carries the run id (h5ad ``uns['embedstore']['run']``,
``metrics.json`` ``run``, the report's ``embedstore.run`` meta tag), the marker names the run
being published while it is, and the previous run's files are removed. The store (``OUT/store``)
and the demo's synthetic cohort are kept, so reruns reuse their embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._atomic import KIND_KEY, atomic_file, atomic_folder, check_replaceable, fsync_dir, swap_in, temp_dir
from embedstore._params import StrList, check_fields, validated
from embedstore._schema import UNS_KEY, Col
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

__all__ = ["METHODS", "EvalResult", "demo", "evaluate"]

METHODS = ("ridge", "knn-raw", "bleep", "softmax", "idw", "learned")
METHOD_NOTES = {
    "ridge": "HEST-Benchmark probe: standard scaling, PCA(256), ridge alpha = 100 / (features x genes)",
    "knn-raw": "kNN on raw (L2-normalised) embeddings, mean of top k; no aligner",
    "bleep": "BLEEP: contrastive aligner, expression exemplars, mean of top k",
    "softmax": "aligner + similarity-softmax over top k (Loki-like)",
    "idw": "aligner + inverse-distance weighting over top k (mclSTExp)",
    "learned": "aligner + EGN-style exemplar attention, trained leaving each reference slide/patient out",
}
N_SET = 50  # genes in the HVG and highest-mean gene sets (HEST; BLEEP/mclSTExp)
EVAL_KIND = "evaluation"
MARKER = "evaluation.json"
# Entries of an evaluation folder that a run never replaces or removes.
KEPT = ("store", "synthetic-cohort", MARKER)


@dataclasses.dataclass
class EvalResult:
    """Where an evaluation wrote its files, and its metrics."""

    out: Path
    metrics: dict[str, Any]
    report: Path

    def table(self) -> str:
        """Methods x gene sets, Pearson mean ± SD over slides, as plain text."""
        from embedstore.report import format_table

        return format_table(self.metrics)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Knobs shared by every method of one evaluation."""

    k: int = 50
    n_genes: int = 250
    seed: int = 0
    tau: float = 0.1
    aligner: tuple[tuple[str, Any], ...] = ()  # AlignerConfig overrides
    methods: tuple[str, ...] = METHODS


@validated(methods=StrList(choices=METHODS, nonempty=True))
def evaluate(
    reference: str | Path,
    out: str | Path,
    query: str | Path | None = None,
    *,
    encoder: str | None = None,
    weights: str | None = None,
    store: str | Path | None = None,
    k: int = 50,
    n_genes: int = 250,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    aligner: dict[str, Any] | None = None,
    workers: int = 2,
    batch_size: int = 32,
) -> EvalResult:
    """Compare every method on the same embeddings, gene sets and leakage-free split.

    Parameters
    ----------
    reference
        Reference ST data set (any layout :func:`embedstore.spots.read_dataset` accepts).
    out
        Folder for ``predictions_<method>.h5ad``, ``metrics.json`` and ``report.html``.
    query
        Query ST data set; ``None`` cross-validates ``reference`` with patient-level folds
        (section-level when it has one patient; the report says which).
    encoder, weights
        Encoder (built-in by default) and where its weights are.
    store
        Store to embed into (``OUT/store`` by default); reruns reuse its embeddings.
    k, n_genes, seed
        Neighbours of the kNN methods, panel size (most variable reference genes), seed.
    methods
        Subset of :data:`METHODS`.
    aligner
        :class:`~embedstore.aligner.AlignerConfig` overrides.
    workers, batch_size
        Embedding settings.
    """
    from embedstore.embedding import embed
    from embedstore.encoders import DEFAULT_ENCODER, create_encoder

    for data in (reference, query):
        if data is not None and not Path(data).exists():
            msg = f"{data}: no such data set; pass an ST data set folder (her2st, STUtility, Visium outs or HEST)"
            raise BadInput(msg)
    if aligner is not None:
        from embedstore.aligner import FIELD_RULES, AlignerConfig

        check_fields(AlignerConfig, aligner, "evaluate aligner settings", ranges=False, **FIELD_RULES)
    check_data_sets(reference, query, k=k, n_genes=n_genes)  # seconds, before minutes of embedding
    out = Path(out)
    store = Path(store) if store else out / "store"
    if store.resolve() == out.resolve():
        msg = f"{out}: the same folder as --store; give the evaluation its own --out (the store goes to OUT/store by default)"
        raise BadInput(msg)
    prepare_out(out)
    settings = Settings(k, n_genes, seed, aligner=tuple(sorted((aligner or {}).items())), methods=tuple(methods))
    enc_name = (
        create_encoder(encoder or DEFAULT_ENCODER, weights=weights).name if weights else (encoder or DEFAULT_ENCODER)
    )

    cohorts = {"reference": Path(reference)} | ({"query": Path(query)} if query else {})
    thumbnails: dict[str, Any] = {}
    skipped_notes = []
    for cohort, data in cohorts.items():
        report = embed(data, store, enc_name, weights=weights, cohort=cohort, workers=workers, batch_size=batch_size)
        failed = [r for r in report.results if r.status == "failed"]
        if len(failed) == len(report.results):
            msg = f"{data}: no section could be embedded ({failed[0].reason}); fix the data set"
            raise BadInput(msg)
        for r in failed:  # evaluate what can be evaluated, and say plainly what was left out
            LOG.warning("%s: %s left out of the evaluation: %s", cohort, r.slide_id, r.reason)
            skipped_notes.append(f"{cohort} section {r.slide_id} left out: {r.reason}")
        thumbnails.update(_thumbnails(data))

    from embedstore.reference import load_reference

    ref = load_reference(store, enc_name, cohort="reference")
    run = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    # The run is written into a fresh folder and published only once complete.
    with temp_dir(out / "results", shown_as=out) as staging:
        if query:
            qry = load_reference(store, enc_name, cohort="query")
            predictions, truth, gene_sets = _run_split(ref, qry, settings)
            _write_predictions(staging, predictions, run)
            folds_note = f"reference {reference} ({len(set(ref.column(Col.SLIDE_ID)))} slides) -> query {query}"
            metrics = _score(predictions, truth, gene_sets)
            metrics["split"] = {"mode": "reference-query", "reference": str(reference), "query": str(query)}
            report_inputs = (predictions, truth)
        else:
            metrics, report_inputs, folds_note = _cross_validate(ref, settings, staging, run)
        metrics["settings"] = {**dataclasses.asdict(settings), "encoder": ref.encoder, "methods_described": METHOD_NOTES}
        metrics["run"] = run
        _write_json(staging / "metrics.json", metrics)

        from embedstore.report import write_report

        notes = [folds_note, *_verdicts(metrics), *skipped_notes]
        write_report(
            staging, metrics, report_inputs[0], report_inputs[1], thumbnails,
            title=f"embedstore evaluation: {Path(reference).name}" + (f" -> {Path(query).name}" if query else " (cross-validation)"),
            notes=notes, max_map_slides=6, run=run,
        )  # fmt: skip
        _publish(out, staging, run)
    return EvalResult(out, metrics, out / "report.html")


def prepare_out(out: Path) -> None:
    """Refuse an ``--out`` that is not an (empty or) embedstore evaluation folder; create and mark it.

    The marker is written before anything else, so a run killed before publishing leaves a
    folder that the rerun recognises as its own.
    """
    check_replaceable(out, EVAL_KIND, what="evaluation folder", folder=True, stores_inside=("store",))
    if _read_marker(out) is None:
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out, {"run": None, "files": []})


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get(KIND_KEY) == EVAL_KIND else None


def _write_marker(out: Path, doc: dict[str, Any]) -> None:
    _write_json(out / MARKER, {KIND_KEY: EVAL_KIND, **doc})


def _write_json(path: Path, doc: Any) -> None:
    text = json.dumps(doc, indent=1, default=_json_default)
    with atomic_file(path, size_hint=len(text)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _result_name(name: Any) -> bool:
    """A name an evaluation run may replace or remove: a plain entry of OUT, not the store or marker."""
    return isinstance(name, str) and name not in KEPT and "/" not in name and not name.startswith(".")


def _publish(out: Path, staging: Path, run: str) -> None:
    """Move a complete run from ``staging`` into ``out`` and remove the previous run's files.

    The marker first names the incoming run and its files, then (once they are in place and
    the old ones gone) only the new run, so a kill in between leaves stamped files and a marker
    that lists every file to clean; the next run removes them.
    """
    names = sorted(p.name for p in staging.iterdir())
    old = _read_marker(out) or {}
    previous = {n for n in [*old.get("files", []), *old.get("incoming", [])] if _result_name(n)}
    foreign = [out / n for n in names if n not in previous and (out / n).exists()]
    if foreign:  # a file the user put there under one of our names
        msg = f"{foreign[0]}: not written by an earlier evaluation; move it away or choose another --out"
        raise BadInput(msg)
    _write_marker(out, {"run": old.get("run"), "files": old.get("files", []), "incoming_run": run, "incoming": names})
    for name in names:
        swap_in(staging / name, out / name)  # an old folder of that name lands in staging and goes with it
    for name in sorted(previous - set(names)):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    _write_marker(out, {"run": run, "files": names, "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    fsync_dir(out)


def check_data_sets(reference: str | Path, query: str | Path | None, *, k: int, n_genes: int) -> None:
    """Refuse settings the data sets cannot support, from their spots and genes alone (no images read).

    Raises
    ------
    BadInput
        When a data set has no section with an image, the query shares no gene with the
        reference, cross-validation has a single group, ``k`` exceeds the reference spots
        of the smallest training part, or ``n_genes`` exceeds the genes it measures.
    """
    from embedstore.spots import read_dataset

    def usable(data: str | Path) -> list[Any]:
        # Sections without an image cannot be embedded: they are left out of the evaluation.
        found = [s for s in read_dataset(data, join=None) if s.uns[UNS_KEY].get("image_path")]
        if not found:
            msg = f"{data}: no section has an H&E image; add the images the spot coordinates refer to"
            raise BadInput(msg)
        return found

    def common_genes(sections: Sequence[Any]) -> set[str]:
        return set.intersection(*(set(map(str, s.var_names)) for s in sections))

    ref = usable(reference)
    if query is not None:
        ref_genes, qry_genes = common_genes(ref), common_genes(usable(query))
        if not ref_genes & qry_genes:
            msg = (
                f"{query}: shares no gene with the reference {reference} (e.g. {sorted(qry_genes)[:3]} vs "
                f"{sorted(ref_genes)[:3]}); name genes alike in both (symbols or Ensembl ids)"
            )
            raise BadInput(msg)
        folds = [(f"the reference {reference}", ref)]
    else:
        patients = [s.uns[UNS_KEY].get("patient") for s in ref]
        by_patient = all(p is not None for p in patients) and len(set(patients)) > 1
        groups = [str(p) for p in patients] if by_patient else [s.uns[UNS_KEY]["slide_id"] for s in ref]
        if len(set(groups)) < 2:
            unit = "patient" if by_patient else "section"
            msg = f"{reference}: cross-validation needs at least 2 {unit}s with an image, the data set has 1; give a --query data set"
            raise BadInput(msg)
        folds = [
            (f"the training part without {g}", [s for s, h in zip(ref, groups, strict=True) if h != g])
            for g in sorted(set(groups))
        ]
    spots = min(folds, key=lambda f: sum(s.n_obs for s in f[1]))
    n_spots = sum(s.n_obs for s in spots[1])
    if k > n_spots:
        msg = f"k={k} (--k): larger than the {n_spots} reference spots of {spots[0]}; pass --k {n_spots} or less"
        raise BadInput(msg)
    genes = min(folds, key=lambda f: len(common_genes(f[1])))
    n_common = len(common_genes(genes[1]))
    if n_genes > n_common:
        msg = f"n_genes={n_genes} (--n-genes): larger than the {n_common} genes measured in every section of {genes[0]}; pass --n-genes {n_common} or less"
        raise BadInput(msg)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def _thumbnails(data: Path) -> dict[str, Any]:
    """Thumbnail and its scale (thumbnail px per level-0 px) of each section's image."""
    from embedstore.slides import open_slide
    from embedstore.spots import read_dataset

    thumbs = {}
    for section in read_dataset(data, join=None):
        info = section.uns[UNS_KEY]
        if not info.get("image_path"):
            continue
        with open_slide(info["image_path"], mpp=info.get("mpp")) as slide:
            thumb = slide.thumbnail(768)
            thumbs[info["slide_id"]] = (thumb, thumb.size[0] / slide.dimensions[0])
    return thumbs


def _gene_sets(ref: Any, n_genes: int) -> tuple[Any, dict[str, list[str]]]:
    """Panel = top-``n_genes`` HVG plus the genes of both gene sets (top-50 HVG, top-50 mean), chosen on the reference.

    Every gene of a gene set is in the panel, so every method predicts it: with ``n_genes``
    under 50, ``hvg50`` would otherwise be scored on the few HVG the panel kept.
    """
    from embedstore.expression import select_panel

    hvg_panel = select_panel(ref.counts, ref.genes, "hvg", n_genes)
    hvg50 = list(select_panel(ref.counts, ref.genes, "hvg", N_SET).genes)
    mean50 = list(select_panel(ref.counts, ref.genes, "mean", N_SET).genes)
    genes = list(dict.fromkeys([*hvg_panel.genes, *hvg50, *mean50]))
    panel = select_panel(ref.counts, ref.genes, genes)
    return panel, {f"hvg{N_SET}": hvg50, f"mean{N_SET}": mean50, "panel": genes}


def _truth(qry: Any, panel: Any) -> Any:
    """Measured log-normalised expression of the query spots over the panel genes it has."""
    from embedstore.expression import apply_panel, normalize_log1p
    from embedstore.prediction import prediction_anndata

    present = [g for g in panel.genes if g in set(qry.genes)]
    values = apply_panel(normalize_log1p(qry.counts), qry.genes, present)
    return prediction_anndata(values, present, qry.obs.to_pandas())


def _run_split(ref: Any, qry: Any, s: Settings) -> tuple[dict[str, Any], Any, dict[str, list[str]]]:
    """Build every method on ``ref`` and predict ``qry``; returns predictions, truth, gene sets."""
    from embedstore.expression import apply_panel, normalize_log1p
    from embedstore.prediction import prediction_anndata
    from embedstore.probe import fit_ridge_probe
    from embedstore.reference import build_reference_index

    panel, gene_sets = _gene_sets(ref, s.n_genes)
    expr = apply_panel(normalize_log1p(ref.counts), ref.genes, panel)
    k = min(s.k, len(ref.embeddings) - 1)
    obs = qry.obs.to_pandas()
    values: dict[str, np.ndarray] = {}
    if "ridge" in s.methods:
        values["ridge"] = fit_ridge_probe(ref.embeddings, expr, seed=s.seed).predict(qry.embeddings)
    if "knn-raw" in s.methods:
        raw = build_reference_index(ref, panel=panel, aligner=None, aggregator="mean", k=k, seed=s.seed)
        values["knn-raw"] = raw.predict(qry.embeddings, k=k, aggregator="mean")
    aligned_methods = [m for m in ("bleep", "softmax", "idw", "learned") if m in s.methods]
    if aligned_methods:
        idx = build_reference_index(ref, panel=panel, aligner=dict(s.aligner), aggregator="mean", k=k, seed=s.seed)
        named = {"bleep": "mean", "softmax": _softmax(s.tau), "idw": "idw"}
        for m in aligned_methods:
            if m != "learned":
                values[m] = idx.predict(qry.embeddings, k=k, aggregator=named[m])
        if "learned" in aligned_methods:
            group_col = ref.group_column("auto")
            idx.fit_learned_aggregator(ref.embeddings, k=k, seed=s.seed, group_by=group_col)
            values["learned"] = idx.predict(qry.embeddings, k=k)
    predictions = {
        m: prediction_anndata(v, panel.genes, obs, uns={"method": m, "description": METHOD_NOTES[m], "k": k})
        for m, v in values.items()
    }
    return predictions, _truth(qry, panel), gene_sets


def _softmax(tau: float) -> Any:
    from embedstore.aggregate import create_aggregator

    return create_aggregator("softmax", tau=tau)


def _write_predictions(folder: Path, predictions: dict[str, Any], run: str) -> None:
    from embedstore.prediction import write_h5ad

    for method, adata in predictions.items():
        adata.uns[UNS_KEY] = {**dict(adata.uns.get(UNS_KEY, {})), "run": run}
        write_h5ad(adata, folder / f"predictions_{method}.h5ad")


def _score(predictions: dict[str, Any], truth: Any, gene_sets: dict[str, list[str]]) -> dict[str, Any]:
    from embedstore.report import score_predictions

    return score_predictions(predictions, truth, gene_sets)


def _cross_validate(ref: Any, s: Settings, out: Path, run: str) -> tuple[dict[str, Any], tuple[Any, Any], str]:
    """Leave-one-group-out over patients (or sections); per-slide scores merged over folds."""
    import anndata as ad

    group_col = ref.group_column("auto")
    groups = ref.column(group_col).astype(str)
    unique = sorted(set(groups))
    if len(unique) < 2:
        msg = f"cross-validation needs at least 2 {group_col}s; the data set has {len(unique)}: give a --query data set"
        raise BadInput(msg)
    unit = (
        "patient"
        if group_col == Col.PATIENT
        else "section (the data set has one patient, so folds are not independent patients)"
    )
    fold_metrics, preds_all, truths = [], {}, []
    for g in unique:
        LOG.info("fold %s: held out", g)
        train, test = ref.subset(groups != g), ref.subset(groups == g)
        predictions, truth, gene_sets = _run_split(train, test, s)
        _write_predictions(out / f"fold-{g}", predictions, run)
        m = _score(predictions, truth, gene_sets)
        _write_json(out / f"fold-{g}" / "metrics.json", {**m, "run": run})
        fold_metrics.append(m)
        truths.append(truth)
        for method, p in predictions.items():
            preds_all.setdefault(method, []).append(p)
    merged = _merge_folds(fold_metrics, unique)
    merged["split"] = {"mode": "cross-validation", "unit": group_col, "folds": unique}
    # For the report's maps and distributions: the genes every fold's panel shares.
    common = sorted(set.intersection(*(set(t.var_names) for t in truths)))
    truth = ad.concat([t[:, common] for t in truths])
    preds = {m: ad.concat([p[:, common] for p in ps]) for m, ps in preds_all.items()}
    note = f"cross-validation, leave one {unit} out: {len(unique)} folds ({', '.join(unique)}); gene sets chosen on each fold's training part"
    return merged, (preds, truth), note


_STATS = ("pearson", "spearman", "mse", "mae")


def _merge_folds(fold_metrics: list[dict[str, Any]], folds: list[str]) -> dict[str, Any]:
    """Pool per-slide scores of every fold: each slide is scored once, by the fold that held it out.

    Each fold scores its own gene sets (chosen on its training part). A gene set's size is
    computed here once (:func:`~embedstore.report.gene_set_size`): the genes scored in each
    fold and those scored in every fold; per-gene numbers cover the latter, so the figures
    and the label agree.
    """
    from embedstore.report import gene_set_size

    merged: dict[str, Any] = {"methods": {}, "folds": dict(zip(folds, fold_metrics, strict=True))}
    merged["definition"] = fold_metrics[0].get("definition", "") + (
        " Cross-validation: each fold's gene sets are chosen on its training slides; per-slide values of all folds "
        "are pooled and the mean and SD are taken over slides. n_genes_per_fold counts the genes each fold scored; "
        "n_genes counts the genes scored in every fold, and per_gene_pearson (each gene's mean over folds) and the "
        "per-gene figure cover those genes only."
    )
    set_names = list(fold_metrics[0]["gene_sets"])
    first = next(iter(fold_metrics[0]["methods"]))
    # The genes each fold scored (the same for every method of a fold), and those every fold scored.
    scored = {
        gs: {
            f: list(fm["methods"][first]["gene_sets"][gs]["per_gene_pearson"])
            for f, fm in zip(folds, fold_metrics, strict=True)
        }
        for gs in set_names
    }
    shared = {
        gs: [g for g in by_fold[folds[0]] if all(g in v for v in by_fold.values())] for gs, by_fold in scored.items()
    }
    sizes = {}
    for gs in set_names:
        per_fold = {f: len(v) for f, v in scored[gs].items()}
        sizes[gs] = {**gene_set_size(gs, list(per_fold.values()), len(shared[gs])), "n_genes_per_fold": per_fold}
    for method in fold_metrics[0]["methods"]:
        sets: dict[str, Any] = {}
        for gs in set_names:
            per_slide: dict[str, Any] = {}
            counts = {"n_undefined": 0, "n_undefined_spearman": 0, "n_missing": 0}
            missing: set[str] = set()
            per_gene: dict[str, list[float]] = {g: [] for g in shared[gs]}
            for fm in fold_metrics:
                entry = fm["methods"][method]["gene_sets"][gs]
                per_slide.update(entry["per_slide"])
                for c in counts:
                    counts[c] += int(entry.get(c) or 0)
                missing.update(entry.get("missing_genes") or [])
                for gene, r in (entry.get("per_gene_pearson") or {}).items():
                    if r is not None and gene in per_gene:
                        per_gene[gene].append(r)
            summary: dict[str, Any] = {
                "per_slide": per_slide,
                **counts,
                "n_slides": len(per_slide),
                "n_spots": sum(int(v.get("n_spots") or 0) for v in per_slide.values()),
                "n_genes": sizes[gs]["n_genes"],
                "n_genes_per_fold": sizes[gs]["n_genes_per_fold"],
                "missing_genes": sorted(missing),
                # mean over the folds where the gene's r is defined; null when it is in none
                "per_gene_pearson": {g: float(np.mean(v)) if v else None for g, v in per_gene.items()},
            }
            for stat in _STATS:
                vals = np.array([v[f"{stat}_mean"] for v in per_slide.values() if v.get(f"{stat}_mean") is not None])
                summary[f"{stat}_mean"] = float(vals.mean()) if len(vals) else None
                summary[f"{stat}_std_over_slides"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
                summary[f"{stat}_min_over_slides"] = float(vals.min()) if len(vals) else None
                summary[f"{stat}_max_over_slides"] = float(vals.max()) if len(vals) else None
            sets[gs] = summary
        merged["methods"][method] = {"gene_sets": sets}
    # Gene sets differ by fold (chosen on each training part); list each fold's, plus the genes all share.
    merged["fold_gene_sets"] = {f: fm["gene_sets"] for f, fm in zip(folds, fold_metrics, strict=True)}
    merged["gene_sets"] = {
        gs: [g for g in fold_metrics[0]["gene_sets"][gs] if all(g in fm["gene_sets"][gs] for fm in fold_metrics)]
        for gs in set_names
    }
    merged["gene_set_sizes"] = sizes
    return merged


def _verdicts(metrics: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers say: the best method, whether the aligner beats raw kNN, and the ridge probe."""
    notes = []
    methods = metrics["methods"]
    for gs in next(iter(methods.values()))["gene_sets"]:
        score = {m: methods[m]["gene_sets"][gs].get("pearson_mean") for m in methods}
        score = {m: v for m, v in score.items() if v is not None}
        if not score:
            continue
        best = max(score, key=score.get)
        parts = [f"{gs}: best method {best} (Pearson {score[best]:.3f})"]
        if "knn-raw" in score:
            aligned = {m: score[m] for m in ("bleep", "softmax", "idw", "learned") if m in score}
            beats = [m for m, v in aligned.items() if v > score["knn-raw"]]
            if aligned:
                parts.append(
                    f"aligned methods beating raw kNN ({score['knn-raw']:.3f}): {', '.join(beats) or 'none - the aligner did not help here'}"
                )
        if "ridge" in score and best != "ridge":
            parts.append(
                f"best vs ridge probe ({score['ridge']:.3f}): {'at least as good' if score[best] >= score['ridge'] else 'worse'}"
            )
        elif "ridge" in score:
            parts.append("the ridge probe is the best method here")
        notes.append("; ".join(parts))
    return notes


@validated
def demo(out: str | Path = "demo-out", data: str | Path | None = None, seed: int = 0) -> EvalResult:
    """The offline main job: synthetic cohort (or ``data``), embed, align, index, predict, evaluate.

    Parameters
    ----------
    out
        Output folder.
    data
        A real ST data set to cross-validate instead of the synthetic cohort.
    seed
        Seed of the synthetic cohort and of training.
    """
    out = Path(out)
    prepare_out(out)  # before the synthetic cohort is written into it
    synthetic = data is None
    if synthetic:
        from embedstore.testing import make_synthetic_cohort

        cohort_dir = out / "synthetic-cohort"
        if not (cohort_dir / "data").is_dir():
            # Generated beside and swapped in: a killed run never leaves half a cohort to evaluate.
            with atomic_folder(cohort_dir) as tmp:
                make_synthetic_cohort(
                    tmp, n_slides=6, n_patients=3, n_spots=80, n_genes=60, seed=seed, width=3000, height=3000
                )
        data = cohort_dir
    # The synthetic cohort has ~80 spots per slide: fewer neighbours and genes than a real cohort.
    return evaluate(data, out, seed=seed, k=20 if synthetic else 50, n_genes=60 if synthetic else 250)
