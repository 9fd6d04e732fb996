"""The evaluation stage: every method on the same embeddings, genes and leakage-free splits.

``evaluate`` embeds a reference and a query ST data set (or cross-validates one data set by
patient, or by section when it has one patient) and measures the stages users run: for each
split it chooses the gene panel and gene sets on the training slides, writes two index
folders with :func:`embedstore.build.build_index` from those slides (``knn-raw``: raw
embeddings; ``aligned``: aligner and learned aggregator; with an encoder that has a text tower,
such as OmiCLIP, ``loki`` and ``loki-tuned``: the text embeddings of the training spots' gene
sentences, zero-shot and with fine-tuned heads), predicts the held-out slides with
:func:`embedstore.prediction.predict` (``bleep``, ``softmax`` and ``idw`` are the aligned
index queried with that aggregator), fits the HEST ridge probe on the stored embeddings,
and writes ``predictions_<method>.h5ad``, ``metrics.json``, ``report.html`` and the index
folders (``indexes/``, or ``fold-<group>/indexes/``).

The output folder is marked by ``evaluation.json`` (``embedstore.kind = "evaluation"``, the run id
and the files of the run). A run is written into a temporary folder and published file by file
only once complete; every file carries the run id (h5ad ``uns['embedstore']['run']``,
``metrics.json`` ``run``, the report's ``embedstore.run`` meta tag), the marker names the run
being published while it is, and the previous run's files are removed. The store (``OUT/store``)
and the demo's synthetic cohort (:mod:`embedstore.demo`) are kept, so reruns reuse their embeddings.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable, fsync_dir, swap_in, temp_dir
from embedstore._params import StrList, check_fields, validated
from embedstore._progress import stage, step
from embedstore._schema import UNS_KEY, Col
from embedstore.errors import BadInput

if TYPE_CHECKING:
    from embedstore.build import Reference

LOG = logging.getLogger(__name__)

__all__ = ["METHODS", "EvalResult", "evaluate", "prepare_out"]

METHODS = ("ridge", "knn-raw", "bleep", "softmax", "idw", "learned", "loki", "loki-tuned")
# Methods that need text embeddings of gene sentences: run by default with an encoder that has a text tower.
TEXT_METHODS = ("loki", "loki-tuned")
# What evaluate adds to the methods, each reported as its paired gain over the same method without it:
# context features from the store, spatial smoothing of the predictions, Macenko stain normalisation.
ADDITIONS = ("context", "smooth", "stain")
ADDITION_NOTES = {
    "context": "the encoder's embeddings plus the means of those within 250 and 600 µm (embedstore context)",
    "smooth": "predictions smoothed over tiles within 250 µm, strength chosen on the reference by leave-one-out",
    "stain": "tiles Macenko-normalised to the reference stain before encoding (embed --stain-norm macenko)",
}
# The methods run again with context or stain (the aligned index serves bleep, softmax, idw and learned).
VARIANT_METHODS = ("ridge", "knn-raw", "bleep", "softmax", "idw", "learned")
SMOOTHED = ("knn-raw", "bleep", "softmax", "idw", "learned", "loki", "loki-tuned")  # index methods
STAIN_STORE = "store-stain"  # OUT/store-stain (beside --store): the cohorts embedded from stain-normalised tiles
METHOD_NOTES = {
    "ridge": "HEST-Benchmark probe: standard scaling, PCA(256), ridge alpha = 100 / (features x genes)",
    "knn-raw": "kNN on raw (L2-normalised) embeddings, mean of top k; no aligner",
    "bleep": "BLEEP: contrastive aligner, expression exemplars, mean of top k",
    "softmax": "aligner + similarity-softmax over top k, tau = 0.1 (Loki-like)",
    "idw": "aligner + inverse-distance weighting over top k (mclSTExp)",
    "learned": "aligner + EGN-style exemplar attention, trained leaving each reference slide/patient out",
    "loki": "Loki: image embedding vs text embeddings of the training spots' gene sentences (zero-shot), similarity-weighted top k",
    "loki-tuned": "Loki with image and text heads fine-tuned contrastively on the training pairs (patients held out for early stopping)",
}
N_SET = 50  # genes in the HVG and highest-mean gene sets (HEST; BLEEP/mclSTExp)
EVAL_KIND = "evaluation"
MARKER = "evaluation.json"
SYNTHETIC_COHORT = "synthetic-cohort"  # where embedstore.demo writes its cohort
# Entries of an evaluation folder that a run never replaces or removes.
KEPT = ("store", STAIN_STORE, SYNTHETIC_COHORT, MARKER)
INDEXES = "indexes"  # folder of a split's index folders
ALIGNED = ("bleep", "softmax", "idw", "learned")  # methods served by the aligned index
# Aggregator each kNN method asks predict() for: a registered one with its default parameters,
# or (None) the index's own, trained one.
AGGREGATOR_OF = {
    "knn-raw": "mean", "bleep": "mean", "softmax": "softmax", "idw": "idw", "learned": None,
    "loki": "loki", "loki-tuned": "loki",
}  # fmt: skip


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
    aligner: tuple[tuple[str, Any], ...] = ()  # AlignerConfig overrides
    methods: tuple[str, ...] = METHODS
    additions: tuple[str, ...] = ADDITIONS


@dataclasses.dataclass(frozen=True)
class Variant:
    """The embeddings one family of methods is evaluated on: a method-name suffix, a store and a table."""

    suffix: str  # "" (the encoder's embeddings), "+context" or "+stain"
    store: Path
    encoder: str  # the table read: the encoder's, or its context table


@validated(methods=StrList(choices=METHODS, nonempty=True, optional=True), additions=StrList(choices=ADDITIONS))
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
    methods: Sequence[str] | None = None,
    aligner: dict[str, Any] | None = None,
    additions: Sequence[str] = ADDITIONS,
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
        Subset of :data:`METHODS`; by default all of them, the text methods (``loki``,
        ``loki-tuned``) only with an encoder that has a text tower (OmiCLIP).
    aligner
        :class:`~embedstore.aligner.AlignerConfig` overrides.
    additions
        What is added to the methods and reported as a paired gain over the same method without
        it (``metrics['gains']``): ``"context"`` (:func:`embedstore.context.embed_context`
        features: ridge, knn-raw and the aligned methods again on them), ``"smooth"`` (every
        index method's predictions smoothed, strength chosen on the training slides) and
        ``"stain"`` (the cohorts embedded again from Macenko-normalised tiles into a store beside
        ``store``: ``OUT/store-stain`` by default). All three by default; ``()`` for none.
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
    sections = check_data_sets(reference, query, k=k, n_genes=n_genes)  # seconds, before minutes of embedding
    out = Path(out)
    store = Path(store) if store else out / "store"
    if store.resolve() == out.resolve():
        msg = f"{out}: the same folder as --store; give the evaluation its own --out (the store goes to OUT/store by default)"
        raise BadInput(msg)
    prepare_out(out)
    enc_name = (
        create_encoder(encoder or DEFAULT_ENCODER, weights=weights).name if weights else (encoder or DEFAULT_ENCODER)
    )
    methods = _methods(methods, enc_name)
    settings = Settings(
        k, n_genes, seed, aligner=tuple(sorted((aligner or {}).items())), methods=methods,
        additions=tuple(dict.fromkeys(additions)),
    )  # fmt: skip

    cohorts = {"reference": Path(reference)} | ({"query": Path(query)} if query else {})
    thumbnails: dict[str, Any] = {}
    skipped_notes = []
    for cohort, data in cohorts.items():
        with stage("embedding the %s cohort %s", cohort, data):
            report = embed(
                data, store, enc_name, weights=weights, cohort=cohort, workers=workers, batch_size=batch_size
            )
        failed = [r for r in report.results if r.status == "failed"]
        if len(failed) == len(report.results):
            msg = f"{data}: no section could be embedded ({failed[0].reason}); fix the data set"
            raise BadInput(msg)
        for r in failed:  # evaluate what can be evaluated, and say plainly what was left out
            LOG.warning("%s: %s left out of the evaluation: %s", cohort, r.slide_id, r.reason)
            skipped_notes.append(f"{cohort} section {r.slide_id} left out: {r.reason}")
        thumbnails.update(_thumbnails(sections[cohort]))

    if any(m in TEXT_METHODS for m in methods):
        from embedstore.text_embedding import embed_text

        # the reference's gene sentences only: the query's expression is what is predicted
        with stage("embedding the gene sentences of the reference cohort (text tower of %s)", enc_name):
            embed_text(store, enc_name, cohort="reference", weights=weights)

    variants = [Variant("", store, enc_name)]
    if "context" in settings.additions:
        variants.append(_context_variant(store, enc_name, cohorts))
    if "stain" in settings.additions:
        # beside the store (OUT/store-stain by default), so that reruns reuse it as they reuse the store
        stain_store = store.with_name(store.name + "-stain")
        variants.append(_stain_variant(stain_store, enc_name, cohorts, weights, workers, batch_size))

    from embedstore.build import load_reference
    from embedstore.store import open_store

    st = open_store(store)
    ref = load_reference(st, enc_name, cohort="reference")
    run = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    # The run is written into a fresh folder and published only once complete.
    with temp_dir(out / "results", shown_as=out) as staging:
        if query:

            def query_split(v: Variant) -> Split:
                vst = open_store(v.store)
                return Split(
                    "query", load_reference(vst, v.encoder, cohort="reference"),
                    load_reference(vst, v.encoder, cohort="query"), None, "query",
                )  # fmt: skip

            predictions, truth, gene_sets = _run_variants(variants, query_split, settings, staging)
            _write_predictions(staging, predictions, run)
            folds_note = f"reference {reference} ({len(set(ref.column(Col.SLIDE_ID)))} slides) -> query {query}"
            with stage("scoring"):
                metrics = _score(predictions, truth, gene_sets)
            metrics["split"] = {"mode": "reference-query", "reference": str(reference), "query": str(query)}
            report_inputs = (predictions, truth)
        else:
            metrics, report_inputs, folds_note = _cross_validate(variants, ref, settings, staging, run)
        from embedstore.scoring import paired_gains

        metrics["gains"] = paired_gains(metrics, settings.additions)
        metrics["settings"] = {
            **dataclasses.asdict(settings),
            "encoder": ref.encoder,
            "methods_described": METHOD_NOTES,
            "additions_described": {a: ADDITION_NOTES[a] for a in settings.additions},
        }
        metrics["run"] = run
        _write_json(staging / "metrics.json", metrics)

        from embedstore.report import format_gains, write_report

        notes = [folds_note, *_verdicts(metrics), *format_gains(metrics), *skipped_notes]
        with stage("writing the report"):
            write_report(
                staging, metrics, report_inputs[0], report_inputs[1], thumbnails,
                title=f"embedstore evaluation: {Path(reference).name}" + (f" -> {Path(query).name}" if query else " (cross-validation)"),
                notes=notes, max_map_slides=6, run=run,
            )  # fmt: skip
        _publish(out, staging, run)
    step("evaluation written to %s", out)
    return EvalResult(out, metrics, out / "report.html")


def prepare_out(out: Path) -> None:
    """Refuse an ``--out`` that is not an (empty or) embedstore evaluation folder; create and mark it.

    The marker is written before anything else, so a run killed before publishing leaves a
    folder that the rerun recognises as its own.
    """
    check_replaceable(out, EVAL_KIND, what="evaluation folder", folder=True, stores_inside=("store", STAIN_STORE))
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


def check_data_sets(reference: str | Path, query: str | Path | None, *, k: int, n_genes: int) -> dict[str, list[Any]]:
    """Refuse settings the data sets cannot support, from their spots and genes alone (no images read).

    Returns
    -------
    The sections with an image of each data set (AnnData of the spots readers), under
    ``"reference"`` and ``"query"``.

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
    sections = {"reference": ref}
    if query is not None:
        sections["query"] = usable(query)
        ref_genes, qry_genes = common_genes(ref), common_genes(sections["query"])
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
    return sections


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def _thumbnails(sections: Sequence[Any]) -> dict[str, Any]:
    """Thumbnail and its scale (thumbnail px per level-0 px) of each section's image."""
    from embedstore.slides import open_slide

    thumbs = {}
    for section in sections:
        info = section.uns[UNS_KEY]
        with open_slide(info["image_path"], mpp=info.get("mpp")) as slide:
            thumb = slide.thumbnail(768)
            thumbs[info["slide_id"]] = (thumb, thumb.size[0] / slide.dimensions[0])
    return thumbs


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: the training slides of the reference cohort and the slides predicted from them."""

    name: str  # "query" or "fold <group>", in progress lines
    train: Reference  # the training slides, read as build_index reads them
    test: Reference  # the predicted slides
    train_slides: list[str] | None  # None: every slide of the reference cohort
    test_cohort: str
    folder: str = ""  # where its files go, relative to the run's folder


def _methods(methods: Sequence[str] | None, encoder: str) -> tuple[str, ...]:
    """The methods to run: those asked for, or all that ``encoder`` supports (text methods need a text tower)."""
    from embedstore.text_embedding import has_text_tower

    text = has_text_tower(encoder)
    if methods is None:
        return tuple(m for m in METHODS if text or m not in TEXT_METHODS)
    asked = [m for m in methods if m in TEXT_METHODS]
    if asked and not text:
        msg = f"methods {', '.join(asked)}: need an encoder with a text tower (e.g. --encoder omiclip); {encoder} has none"
        raise BadInput(msg)
    return tuple(dict.fromkeys(methods))


def _gene_sets(ref: Any, n_genes: int) -> tuple[Any, dict[str, list[str]]]:
    """Panel = top-``n_genes`` HVG plus the genes of both gene sets (top-50 HVG, top-50 mean), chosen on the reference.

    Every gene of a gene set is in the panel, so every method predicts it: with ``n_genes``
    under 50, ``hvg50`` would otherwise be scored on the few HVG the panel kept. The index
    recipes ask :func:`~embedstore.build.build_index` for the same panel (:func:`_recipe`).
    """
    from embedstore.expression import select_panel

    hvg50 = list(select_panel(ref.counts, ref.genes, "hvg", N_SET).genes)
    mean50 = list(select_panel(ref.counts, ref.genes, "mean", N_SET).genes)
    panel = select_panel(ref.counts, ref.genes, "hvg", n_genes, include=_set_genes(hvg50, mean50))
    return panel, {f"hvg{N_SET}": hvg50, f"mean{N_SET}": mean50, "panel": list(panel.genes)}


def _set_genes(*gene_sets: list[str]) -> list[str]:
    """The genes of the gene sets, once each, in order."""
    return list(dict.fromkeys(g for genes in gene_sets for g in genes))


def _recipe(name: str, encoder: str, gene_sets: dict[str, list[str]], k: int, s: Settings) -> Any:
    """Recipe of a split's index: ``knn-raw`` (raw embeddings, mean of top k), ``aligned`` (aligner,
    learned aggregator), ``loki`` (text keys, zero-shot) or ``loki-tuned`` (text keys, fine-tuned heads)."""
    from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe

    include = _set_genes(gene_sets[f"hvg{N_SET}"], gene_sets[f"mean{N_SET}"])
    keys, aligner, aggregator = {
        "knn-raw": ("image", None, "mean"),
        "aligned": ("expression", dict(s.aligner), "learned"),
        "loki": ("text", None, "loki"),
        "loki-tuned": ("text", {}, "loki"),
    }[name]
    return Recipe(
        name=name,
        encoder=encoder,
        cohort="reference",
        aligner=aligner,
        panel=PanelSpec("hvg", s.n_genes, tuple(include)),
        index=IndexSpec(keys=keys),
        aggregator=AggregatorSpec(aggregator, k),
        seed=s.seed,
    )


def _truth(qry: Any, panel: Any) -> Any:
    """Measured log-normalised expression of the query spots over the panel genes it has."""
    from embedstore.expression import apply_panel, normalize_log1p
    from embedstore.prediction import prediction_anndata

    present = [g for g in panel.genes if g in set(qry.genes)]
    values = apply_panel(normalize_log1p(qry.counts), qry.genes, present)
    return prediction_anndata(values, present, qry.obs.to_pandas())


def _run_variants(
    variants: Sequence[Variant], split_of: Any, s: Settings, run_dir: Path
) -> tuple[dict[str, Any], Any, dict[str, list[str]]]:
    """Every method on the split of each variant (the encoder's embeddings, its context, stain-normalised ones).

    ``split_of(variant)`` reads the variant's training and test slides. The gene panel, the
    gene sets and the truth are the base variant's (every variant holds the same spots and
    counts); each test slide's H&E is read once, from the base store, and put in every
    method's ``uns['spatial']``.
    """
    from embedstore.prediction import spatial_libraries
    from embedstore.store import open_store

    predictions: dict[str, Any] = {}
    truth = gene_sets = None
    for v in variants:
        split = split_of(v)
        methods = s.methods if not v.suffix else tuple(m for m in s.methods if m in VARIANT_METHODS)
        preds, t, gs = _run_split(
            open_store(v.store), split, dataclasses.replace(s, methods=methods), run_dir, v.suffix
        )
        if not v.suffix:
            truth, gene_sets, base = t, gs, split
        predictions.update(preds)
    test_slides = list(dict.fromkeys(base.test.column(Col.SLIDE_ID)))
    # Every method's file draws over the H&E (lowres only: one copy per method and slide).
    libraries = spatial_libraries(
        open_store(variants[0].store), variants[0].encoder, [(base.test_cohort, t) for t in test_slides], hires=False
    )
    for adata in predictions.values():
        adata.uns["spatial"] = libraries
    return predictions, truth, gene_sets


def _run_split(
    st: Any, split: Split, s: Settings, run_dir: Path, suffix: str = ""
) -> tuple[dict[str, Any], Any, dict[str, list[str]]]:
    """Build every method on the split's training slides and predict its test slides.

    The kNN methods run the public stages: :func:`~embedstore.build.build_index` writes the
    ``knn-raw``, ``aligned`` (and Loki) index folders into ``run_dir/<split.folder>/indexes/``
    and :func:`~embedstore.prediction.predict` reads them back; with the ``smooth`` addition each
    index method is predicted again with ``smooth=True`` (``<method>+smooth``). ``suffix``
    (``"+context"``, ``"+stain"``) names the variant in method and index names. Returns
    predictions (by method), truth and gene sets.
    """
    from embedstore.build import build_index
    from embedstore.expression import apply_panel, normalize_log1p
    from embedstore.index_folder import load_index
    from embedstore.prediction import predict, prediction_anndata
    from embedstore.probe import fit_ridge_probe

    train, test = split.train, split.test
    panel, gene_sets = _gene_sets(train, s.n_genes)
    k = min(s.k, len(train.embeddings) - 1)
    test_slides = list(dict.fromkeys(test.column(Col.SLIDE_ID)))
    predictions: dict[str, Any] = {}
    if "ridge" in s.methods:
        with stage("%s: fitting the ridge probe%s", split.name, suffix):
            expr = apply_panel(normalize_log1p(train.counts), train.genes, panel)
            values = fit_ridge_probe(train.embeddings, expr, seed=s.seed).predict(test.embeddings)
        name = f"ridge{suffix}"
        predictions[name] = prediction_anndata(values, panel.genes, test.obs.to_pandas(), uns=_method_uns(name))
    served = {
        "knn-raw": [m for m in ("knn-raw",) if m in s.methods],
        "aligned": [m for m in ALIGNED if m in s.methods],
        **{m: [m] for m in TEXT_METHODS if m in s.methods},
    }
    smoothed = "smooth" in s.additions and not suffix
    for name, methods in served.items():
        if not methods:
            continue
        index = Path(split.folder, INDEXES, f"{name}{suffix}")
        recipe = _recipe(name, train.encoder["name"], gene_sets, k, s)
        with stage(
            "%s: building the %s index from %d slides", split.name, index.name, len(set(train.column(Col.SLIDE_ID)))
        ):
            build_index(recipe, st.root, run_dir / index, slide_ids=split.train_slides)
        loaded = load_index(run_dir / index)  # read once for its methods
        for m in methods:
            for smooth in (False, True) if smoothed and "smoothing" in loaded.manifest else (False,):
                method = f"{m}{suffix}" + ("+smooth" if smooth else "")
                with stage("%s: predicting %s", split.name, method):
                    adata = predict(
                        loaded, st, slide_ids=test_slides, cohort=split.test_cohort, k=k,
                        aggregator=AGGREGATOR_OF[m], images=False, smooth=smooth,
                    )  # fmt: skip
                adata.uns[UNS_KEY] = {**dict(adata.uns[UNS_KEY]), **_method_uns(method), "index": index.as_posix()}
                predictions[method] = adata
    return predictions, _truth(test, panel), gene_sets


def _context_variant(store: Path, encoder: str, cohorts: dict[str, Path]) -> Variant:
    """The cohorts' context features (:func:`embedstore.context.embed_context`), computed once into the store."""
    from embedstore.context import context_table, embed_context

    for cohort in cohorts:
        with stage("context features of the %s cohort (%s)", cohort, encoder):
            embed_context(store, encoder, cohort=cohort, progress=False)
    return Variant("+context", store, context_table(encoder))


def _stain_variant(
    store: Path, encoder: str, cohorts: dict[str, Path], weights: str | None, workers: int, batch_size: int
) -> Variant:
    """The cohorts embedded again from Macenko-normalised tiles, into their own store (reused by reruns)."""
    from embedstore.embedding import embed

    for cohort, data in cohorts.items():
        with stage("embedding the %s cohort %s from stain-normalised tiles", cohort, data):
            report = embed(
                data, store, encoder, weights=weights, cohort=cohort, workers=workers, batch_size=batch_size,
                stain_norm="macenko", progress=False,
            )  # fmt: skip
        failed = [r for r in report.results if r.status == "failed"]
        if failed:
            msg = f"{data}: section {failed[0].slide_id} cannot be stain-normalised ({failed[0].reason}); evaluate with additions that leave out 'stain'"
            raise BadInput(msg)
    return Variant("+stain", store, encoder)


def _method_uns(method: str) -> dict[str, str]:
    base, *added = method.split("+")
    description = METHOD_NOTES[base] + "".join(f"; + {a}: {ADDITION_NOTES[a]}" for a in added)
    return {"method": method, "description": description}


def _write_predictions(folder: Path, predictions: dict[str, Any], run: str) -> None:
    from embedstore.prediction import write_h5ad

    for method, adata in predictions.items():
        adata.uns[UNS_KEY] = {**dict(adata.uns.get(UNS_KEY, {})), "run": run}
        write_h5ad(adata, folder / f"predictions_{method}.h5ad")


def _score(predictions: dict[str, Any], truth: Any, gene_sets: dict[str, list[str]]) -> dict[str, Any]:
    from embedstore.scoring import score_predictions

    return score_predictions(predictions, truth, gene_sets)


def _cross_validate(
    variants: Sequence[Variant], ref: Any, s: Settings, out: Path, run: str
) -> tuple[dict[str, Any], tuple[Any, Any], str]:
    """Leave-one-group-out over patients (or sections); per-slide scores merged over folds.

    Each fold reads its training and held-out slides from the store on their own, as
    :func:`~embedstore.build.build_index` does: the genes of each part are those measured in
    every one of its sections.
    """
    import anndata as ad

    from embedstore.build import load_reference
    from embedstore.store import open_store

    group_col = ref.group_column("auto")
    groups = ref.column(group_col).astype(str)
    slides = ref.column(Col.SLIDE_ID)
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
    for i, g in enumerate(unique, 1):
        train_slides = list(dict.fromkeys(slides[groups != g]))
        test_slides = list(dict.fromkeys(slides[groups == g]))
        step("fold %d/%d: %s %s held out (%d slides), %d training slides", i, len(unique), group_col, g,
             len(test_slides), len(train_slides))  # fmt: skip

        def fold_split(v: Variant, g: str = g, train: list = train_slides, test: list = test_slides) -> Split:
            vst = open_store(v.store)
            return Split(
                f"fold {g}", load_reference(vst, v.encoder, cohort="reference", slide_ids=train),
                load_reference(vst, v.encoder, cohort="reference", slide_ids=test), train, "reference",
                folder=f"fold-{g}",
            )  # fmt: skip

        predictions, truth, gene_sets = _run_variants(variants, fold_split, s, out)
        _write_predictions(out / f"fold-{g}", predictions, run)
        with stage("fold %s: scoring", g):
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
    computed here once (:func:`~embedstore.scoring.gene_set_size`): the genes scored in each
    fold and those scored in every fold; per-gene numbers cover the latter, so the figures
    and the label agree.
    """
    from embedstore.scoring import gene_set_size

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
