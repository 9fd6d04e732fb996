"""The build stage: stored embeddings + measured expression -> aligner, exemplar index, aggregator.

Reads a reference cohort from a store (spot-centred tile embeddings joined to their spots'
counts), chooses the gene panel on it, trains the aligner with whole slides (or patients)
held out for validation, builds the FAISS exemplar index and, when asked, trains the
learned aggregator with retrieval that excludes each spot's own slide. It never touches
slides or encoders: it reads only what the embedding stage wrote.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._params import check_aggregator_params, check_fields, validated
from embedstore._progress import stage, step
from embedstore._schema import Col
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

# Radius of the prediction smoothing chosen on the reference: a legacy-ST spot's 4 nearest
# neighbours (200 µm grid), two rings of Visium spots (100 µm pitch).
SMOOTH_RADIUS_UM = 250.0

__all__ = ["Reference", "build_index", "build_reference_index", "load_reference", "train_aligner", "with_text"]


@dataclasses.dataclass
class Reference:
    """Spots of a reference cohort with their tile embeddings and raw counts, row-aligned."""

    obs: pa.Table  # cohort, slide_id, spot_id, patient, x, y
    embeddings: np.ndarray  # (n, D) float32
    counts: Any  # scipy CSR (n, len(genes)), raw counts
    genes: list[str]  # measured in every section of the reference
    encoder: dict[str, Any]  # encoder metadata of the embeddings (name, cfg, fingerprint, tile geometry)
    text: np.ndarray | None = None  # (n, D) text embeddings of the spots' gene sentences (with_text)
    text_encoder: dict[str, Any] | None = None  # metadata of the text table they come from
    xy_um: np.ndarray | None = None  # (n, 2) spot centres in µm (None when a slide's µm/px is unknown)

    def column(self, name: str) -> np.ndarray:
        """One obs column as a NumPy array of str (None stays None)."""
        return np.asarray(self.obs.column(name).to_pylist(), dtype=object)

    def group_column(self, group_by: str = "auto") -> str:
        """The leakage-free unit: ``"auto"`` is the patient when known and not unique, else the slide."""
        if group_by != "auto":
            return group_by
        patients = self.column(Col.PATIENT)
        usable = all(p is not None for p in patients) and len(set(patients)) > 1
        return Col.PATIENT if usable else Col.SLIDE_ID

    def subset(self, rows: np.ndarray) -> Reference:
        """The reference restricted to ``rows`` (indices or a boolean mask)."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return Reference(
            self.obs.take(pa.array(rows)), self.embeddings[rows], self.counts[rows], self.genes, self.encoder,
            None if self.text is None else self.text[rows], self.text_encoder,
            None if self.xy_um is None else self.xy_um[rows],
        )  # fmt: skip


def with_text(store: Any, ref: Reference) -> Reference:
    """``ref`` with the text embeddings of its spots' gene sentences (``embedstore embed-text``).

    Spots whose sentence is empty (no expressed gene left) have no text embedding and are left
    out, with a log line. The text must come from the checkpoint the image embeddings came from.
    """
    from embedstore.store import open_store
    from embedstore.text_embedding import check_text_pairs, read_text_embeddings, text_metadata

    store = open_store(store) if isinstance(store, str | Path) else store
    slides = list(dict.fromkeys(ref.column(Col.SLIDE_ID)))
    name = ref.encoder["name"]
    meta = text_metadata(store, name, slide_ids=slides)
    check_text_pairs(ref.encoder, meta, f"{store.root} text embeddings of {name}")
    table, text = read_text_embeddings(store, name, slide_ids=slides)
    where = {
        k: i
        for i, k in enumerate(
            zip(table.column(Col.SLIDE_ID).to_pylist(), table.column(Col.SPOT_ID).to_pylist(), strict=True)
        )
    }
    keys = zip(ref.column(Col.SLIDE_ID), ref.column(Col.SPOT_ID), strict=True)
    rows = np.array([where.get(k, -1) for k in keys], dtype=np.int64)
    kept = rows >= 0
    if not kept.any():
        msg = f"{store.root}: no text embedding matches a reference spot of encoder {name}; run embedstore embed-text {store.root} --encoder {name}"
        raise BadInput(msg)
    if not kept.all():
        LOG.warning(
            "reference: %d spots have no gene sentence (no expressed gene) and are left out of the text keys",
            int((~kept).sum()),
        )
    out = ref.subset(kept)
    out.text, out.text_encoder = text[rows[kept]], meta
    return out


def load_reference(
    store: Any,
    encoder: str,
    cohort: str | Sequence[str] | None = None,
    slide_ids: Sequence[str] | None = None,
    exclude_slides: Sequence[str] = (),
) -> Reference:
    """Join a cohort's spot-tile embeddings to its spots' counts.

    Parameters
    ----------
    store
        An open :class:`~embedstore.store.Store` or its path.
    encoder
        Encoder whose embeddings to read.
    cohort, slide_ids
        Selection; a slide id that is not a measured and embedded slide of ``cohort`` is an error.
    exclude_slides
        Slides to leave out (e.g. a held-out fold).

    Returns
    -------
    The :class:`Reference`; genes are those measured in every selected section, so sections
    with different gene lists never contribute invented zeros.
    """
    from embedstore.store import open_store

    store = open_store(store) if isinstance(store, str | Path) else store
    with stage("reading the reference embeddings and counts (cohort %s, encoder %s)", cohort, encoder):
        ref = _read_reference(store, encoder, cohort, slide_ids, exclude_slides)
    step(
        "reference: %d spots from %d slides, %d genes measured in every slide",
        len(ref.embeddings), len(set(ref.column(Col.SLIDE_ID))), len(ref.genes),
    )  # fmt: skip
    return ref


def _read_reference(
    store: Any, encoder: str, cohort: Any, slide_ids: Sequence[str] | None, exclude_slides: Sequence[str]
) -> Reference:
    """:func:`load_reference` on an open store."""
    cohorts = [cohort] if isinstance(cohort, str) else cohort
    listing = store.sql(
        "SELECT DISTINCT cohort, slide_id FROM slides JOIN spots USING (cohort, slide_id) WHERE encoder = ?",
        params=[encoder],
    )
    measured = {
        s: c for c, s in sorted(zip(listing.cohort, listing.slide_id, strict=True)) if cohorts is None or c in cohorts
    }
    if slide_ids is not None:
        _check_slide_ids(slide_ids, set(measured), cohort, encoder, store.root)
    excluded = set(exclude_slides)
    slides = [s for s in (dict.fromkeys(slide_ids) if slide_ids is not None else measured) if s not in excluded]
    if not slides:
        msg = (
            f"{store.root}: no reference slides with expression left for cohort {cohort}; check --cohort and exclusions"
        )
        raise BadInput(msg)
    # The reference's own files: other cohorts of the store may be tiled at another geometry.
    # Every selected file must match the first one's fingerprint and geometry (else one line naming it).
    encoder_meta = store.encoder_metadata(encoder, cohort=cohort, slide_ids=slides)
    meta, emb = store.read_embeddings(encoder, cohort=cohort, slide_ids=slides)
    obs, genes, counts = _read_sections(store, [(measured[s], s) for s in slides])
    key = lambda t: list(zip(t.column(Col.SLIDE_ID).to_pylist(), t.column(Col.SPOT_ID).to_pylist(), strict=True))  # noqa: E731
    where = {k: i for i, k in enumerate(key(obs))}
    pairs = [(i, where.get(k)) for i, k in enumerate(key(meta)) if k[1] is not None]
    pairs = [(e, s) for e, s in pairs if s is not None]
    if not pairs:
        msg = f"{store.root}: no embedded tile matches a measured spot of cohort {cohort}; embed the ST data set itself (spot-centred tiles)"
        raise BadInput(msg)
    e_rows = np.array([e for e, _ in pairs])
    s_rows = np.array([s for _, s in pairs])
    dropped = obs.num_rows - len(s_rows)
    if dropped:
        LOG.warning("reference: %d measured spots have no embedded tile and are left out", dropped)
    cols = [Col.COHORT, Col.SLIDE_ID, Col.SPOT_ID, Col.PATIENT, Col.X, Col.Y]
    joined = obs.take(pa.array(s_rows)).select(cols)
    return Reference(
        joined, emb[e_rows], counts[s_rows], genes, encoder_meta, xy_um=_positions_um(store, encoder, joined)
    )


def _positions_um(store: Any, encoder: str, obs: pa.Table) -> np.ndarray | None:
    """Spot centres in µm (level-0 px times each slide's µm/px); None when a slide's µm/px is unknown."""
    from embedstore.context import slide_mpp

    xy = np.column_stack([obs.column(Col.X).to_numpy(), obs.column(Col.Y).to_numpy()]).astype(np.float64)
    cohorts = np.asarray(obs.column(Col.COHORT).to_pylist(), dtype=object)
    slides = np.asarray(obs.column(Col.SLIDE_ID).to_pylist(), dtype=object)
    for cohort, slide in dict.fromkeys(zip(cohorts, slides, strict=True)):
        try:
            xy[(cohorts == cohort) & (slides == slide)] *= slide_mpp(store, encoder, cohort, slide)
        except BadInput as e:
            LOG.info("reference: spot positions in µm unknown (%s); no spatial smoothing is chosen", e)
            return None
    return xy


def _read_sections(store: Any, sections: Sequence[tuple[str, str]]) -> tuple[pa.Table, list[str], Any]:
    """Spots and CSR counts of ``(cohort, slide_id)`` sections over the genes measured in every one.

    Each section's files are read once; a gene missing from one section is left out, so no
    section contributes invented zeros.
    """
    from scipy import sparse

    parts = [store.read_expression(cohort=c, slide_ids=[s], genes=None) for c, s in sections]
    genes = parts[0][1]
    for _, section_genes, _ in parts[1:]:
        measured = set(section_genes)  # once per section, not once per gene
        genes = [g for g in genes if g in measured]
    counts = []
    for _, section_genes, m in parts:
        column = {g: i for i, g in enumerate(section_genes)}
        counts.append(m[:, [column[g] for g in genes]])
    return pa.concat_tables(obs for obs, _, _ in parts), genes, sparse.vstack(counts, format="csr")


def _check_slide_ids(slide_ids: Sequence[str], available: set[str], cohort: Any, encoder: str, root: Path) -> None:
    """Raise BadInput naming the ``slide_ids`` that are not measured, embedded slides of the cohort."""
    if isinstance(slide_ids, str):
        msg = f"slide_ids={slide_ids!r}: must be a list of slide ids; pass [{slide_ids!r}]"
        raise BadInput(msg)
    unknown = [s for s in slide_ids if s not in available]
    if unknown:
        have = ", ".join(sorted(available)[:10]) or "none"
        msg = (
            f"slide_ids: {', '.join(map(str, unknown[:5]))} not among the slides of cohort {cohort} in {root} "
            f"with spots and {encoder} embeddings ({have}); pass slides of that cohort"
        )
        raise BadInput(msg)


@validated
def build_reference_index(
    ref: Reference,
    *,
    panel: Any = None,
    panel_method: str | Sequence[str] = "hvg",
    n_genes: int = 250,
    aligner: dict[str, Any] | None = None,
    keys: str = "expression",
    factory: str = "auto",
    nprobe: int | None = None,
    target_recall: float = 0.95,
    aggregator: str = "mean",
    aggregator_params: dict[str, Any] | None = None,
    k: int = 50,
    group_by: str = "auto",
    seed: int = 0,
    layout: str = "auto",
    memory_budget: int | str | None = None,
    scratch_dir: str | Path | None = None,
    smooth_radius_um: float | None = SMOOTH_RADIUS_UM,
) -> Any:
    """Panel, aligner, FAISS index and (optionally learned) aggregator from a reference.

    Parameters
    ----------
    ref
        From :func:`load_reference`.
    panel
        A ready :class:`~embedstore.expression.Panel`; otherwise chosen on ``ref`` with
        ``panel_method`` and ``n_genes``.
    aligner
        :class:`~embedstore.aligner.AlignerConfig` fields; ``None`` skips the aligner and
        indexes raw image embeddings ("kNN on raw embeddings"). With ``keys="text"``:
        :class:`~embedstore.text_aligner.TextAlignerConfig` fields of the fine-tuned image and
        text heads; ``None`` is zero-shot Loki.
    keys
        ``"expression"`` (BLEEP), ``"image"`` (EGN) or ``"text"`` (Loki: the text embeddings
        of the spots' gene sentences, ``ref`` from :func:`with_text`) exemplar keys.
    factory, nprobe, target_recall
        FAISS factory string (``"auto"`` picks by size and codec) and IVF probes (None: the
        fewest reaching ``target_recall`` at ``k`` on held-out exemplars).
    aggregator, aggregator_params, k
        Default aggregator of the index; ``"learned"`` trains it here.
    group_by
        ``"auto"`` (patient when known, else slide), ``"slide_id"`` or ``"patient"``: the
        unit held out for aligner validation and excluded from a spot's own retrieval.
    seed
        Seeds the aligner and the learned aggregator.
    layout, memory_budget, scratch_dir
        Where the FAISS index's inverted lists live (``"auto"``: on disk when the keys exceed
        the budget); see :func:`~embedstore.index.build_exemplar_index`.
    smooth_radius_um
        Neighbour radius of the spatial smoothing whose strength is chosen here, on the
        reference, by cross-validation (``manifest['smoothing']``, applied by
        ``predict(smooth=True)``); None chooses none.

    Returns
    -------
    An :class:`~embedstore.index.ExemplarIndex` with ``manifest['k']`` set.
    """
    from embedstore import aligner as aligner_mod
    from embedstore.expression import apply_panel, normalize_log1p, select_panel
    from embedstore.index import build_exemplar_index

    _check_settings(aggregator, aggregator_params, aligner, "build_reference_index", keys)
    if keys == "text" and ref.text is None:
        msg = "build_reference_index: keys='text' needs the reference's text embeddings; pass with_text(store, ref)"
        raise BadInput(msg)
    if k > len(ref.embeddings):
        msg = f"build_reference_index: k={k} (--k): larger than the reference's {len(ref.embeddings)} spots; pass a smaller k"
        raise BadInput(msg)
    with stage("choosing the gene panel and normalising the counts"):
        panel = panel or select_panel(ref.counts, ref.genes, method=panel_method, n=n_genes)
        expr = apply_panel(normalize_log1p(ref.counts), ref.genes, panel)
    step("panel: %d genes (%s)", len(panel), panel.method)
    group_col = ref.group_column(group_by)
    groups = ref.column(group_col).astype(str)
    model = None
    if keys == "text":
        model = _fit_text_aligner(ref, aligner, groups, seed) if aligner is not None else None
    elif aligner is not None:
        cfg = _aligner_config(aligner, ref, panel)
        with stage("training the aligner on %d spots x %d genes", len(expr), len(panel)):
            model = aligner_mod.fit(ref.embeddings, expr, groups if len(set(groups)) > 1 else None, cfg, seed)
    else:
        keys = "image"
    learned = aggregator == "learned"
    idx = build_exemplar_index(
        ref.embeddings, expr, panel,
        ref.column(Col.SLIDE_ID), ref.column(Col.SPOT_ID), ref.column(Col.PATIENT),
        aligner=model, keys=keys, text_emb=ref.text, text_encoder=ref.text_encoder,
        factory=None if factory == "auto" else factory,
        encoder=ref.encoder, aggregator="mean" if learned else aggregator_with(aggregator, aggregator_params),
        nprobe=nprobe, seed=seed, k=k, target_recall=target_recall, layout=layout, memory_budget=memory_budget,
        scratch_dir=scratch_dir,
    )  # fmt: skip
    if learned:
        with stage("training the learned aggregator (k=%d, each %s excluded from its own retrieval)", k, group_col):
            idx.fit_learned_aggregator(ref.embeddings, k=k, seed=seed, group_by=group_col)
    idx.manifest["k"] = int(k)
    idx.manifest["group_by"] = group_col
    if smooth_radius_um is not None and ref.xy_um is not None and len(set(groups)) > 1:
        idx.manifest["smoothing"] = _choose_smoothing(idx, ref, expr, groups, group_col, k, smooth_radius_um)
    return idx


def _choose_smoothing(
    idx: Any, ref: Reference, expr: np.ndarray, groups: np.ndarray, group_col: str, k: int, radius_um: float
) -> dict[str, Any]:
    """The smoothing strength that best recovers the reference's own expression from its leave-group-out predictions.

    Every reference spot is predicted with the exemplars of its own slide (or patient) excluded,
    as a new slide would be, then smoothed over its slide's neighbours at each candidate
    strength; the query never takes part.
    """
    from embedstore.smoothing import choose_alpha

    with stage(
        "choosing the spatial smoothing on the reference (each %s left out, radius %g µm)", group_col, radius_um
    ):
        pred = idx.predict(ref.embeddings, k=k, query_groups=groups, group_by=group_col)
        alpha, scores = choose_alpha(pred, expr, ref.xy_um, ref.column(Col.SLIDE_ID), radius_um)
    step("smoothing: alpha %.2f (Pearson on the reference: %s)", alpha,
         ", ".join(f"{a:g}: {v:.3f}" for a, v in scores.items()))  # fmt: skip
    return {
        "radius_um": float(radius_um),
        "alpha": float(alpha),
        "scores": {f"{a:g}": float(v) for a, v in scores.items()},
        "chosen_on": f"reference, leave one {group_col} out",
    }


def _check_settings(
    aggregator: str, params: dict[str, Any] | None, aligner: dict[str, Any] | None, where: str, keys: str = "expression"
) -> None:
    """Aggregator name and parameters, and aligner settings (keys and types), before any data is read.

    With text keys the aligner settings are those of the text aligner.
    """
    from embedstore.aggregate import AGGREGATORS

    if keys == "text":
        from embedstore import text_aligner as settings_of
    else:
        from embedstore import aligner as settings_of

    check_aggregator_params(AGGREGATORS, aggregator, params or {}, f"{where} [aggregator]")
    if aggregator == "learned" and params:
        msg = f"{where} [aggregator]: the learned aggregator is trained here and takes no parameters; remove {', '.join(params)}"
        raise BadInput(msg)
    if aligner is not None:
        config = settings_of.TextAlignerConfig if keys == "text" else settings_of.AlignerConfig
        check_fields(config, aligner, f"{where} [aligner]", ranges=False, **settings_of.FIELD_RULES)


def aggregator_with(name: str, params: dict[str, Any] | None) -> Any:
    """A registered aggregator by name with its parameters (``"mean"``, ``"softmax"``, ``"idw"``)."""
    from embedstore.aggregate import create_aggregator

    return create_aggregator(name, **(params or {}))


@validated
def build_index(
    recipe: str | Path | Any,
    store: str | Path,
    out: str | Path,
    overwrite: bool = True,
    *,
    slide_ids: Sequence[str] | None = None,
    layout: str = "auto",
    memory_budget: int | str | None = None,
) -> Path:
    """Index stage: rebuild an exemplar index from a recipe (``indexes/*.toml``) and a store.

    Parameters
    ----------
    recipe
        Recipe name, ``.toml`` path, or a :class:`~embedstore.recipes.Recipe` (built in code,
        e.g. with an explicit ``PanelSpec(genes=[...])``).
    store
        Store holding the reference cohort's embeddings and expression.
    out
        Index folder to write (atomically).
    overwrite
        Replace an existing exemplar index (only an index: a folder holding anything else, a
        store or a store's subfolder is refused, untouched).
    slide_ids
        Build from these slides of the recipe's cohort only (e.g. the training slides of a
        fold), in place of the recipe's ``slides``; its ``exclude_slides`` still apply.
    layout, memory_budget
        ``"auto"``: the FAISS index's inverted lists on disk (``index.ivfdata``, memory-mapped
        when loaded) when the exemplars' keys do not fit in ``memory_budget`` (bytes or text such
        as ``"8GB"``; None: half the available memory); ``"memory"`` or ``"ondisk"`` to force one.
        On-disk lists are built beside ``out``.
    """
    from embedstore._atomic import check_replaceable
    from embedstore.index import KIND
    from embedstore.index_folder import save_index
    from embedstore.recipes import Recipe, load_recipe

    # Refuse a bad --out before the minutes of training; save_index checks again before the swap.
    check_replaceable(out, KIND, what="exemplar index", overwrite=overwrite, folder=True)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    # before the reading
    _check_settings(r.aggregator.name, r.aggregator.params, r.aligner, r.source or r.name, r.index.keys)
    selection = list(slide_ids) if slide_ids is not None else list(r.slides) or None
    ref = load_reference(store, r.encoder, cohort=r.cohort, slide_ids=selection, exclude_slides=r.exclude_slides)
    if r.index.keys == "text":
        ref = with_text(store, ref)
    idx = build_reference_index(
        ref, panel=_recipe_panel(r, ref), aligner=r.aligner, keys=r.index.keys,
        factory=r.index.factory, nprobe=r.index.nprobe, target_recall=r.index.target_recall, aggregator=r.aggregator.name,
        aggregator_params=r.aggregator.params, k=r.aggregator.k, group_by=r.group_by, seed=r.seed,
        layout=layout, memory_budget=memory_budget, scratch_dir=Path(out).parent,
    )  # fmt: skip
    idx.manifest["recipe"] = r.to_dict()
    with stage("saving the index to %s", out):
        return save_index(idx, out, overwrite=overwrite)


def _recipe_panel(r: Any, ref: Reference) -> Any:
    """The recipe's panel on ``ref``; a listed gene the reference did not measure names the recipe."""
    from embedstore.expression import select_panel

    listed, measured = list(dict.fromkeys(r.panel.genes)), set(ref.genes)
    missing = [g for g in listed if g not in measured]
    if missing:
        msg = (
            f"{r.source or r.name} [panel]: genes {', '.join(missing[:10])} not measured in every reference "
            f"section of cohort {r.cohort}; remove them from genes"
        )
        raise BadInput(msg)
    if r.panel.method == "list":
        return select_panel(ref.counts, ref.genes, listed)
    return select_panel(ref.counts, ref.genes, r.panel.method, r.panel.n_genes, include=listed)


@validated
def train_aligner(
    store: str | Path,
    encoder: str,
    out: str | Path,
    *,
    cohort: str | None = None,
    panel_method: str | Sequence[str] = "hvg",
    n_genes: int = 250,
    group_by: str = "auto",
    seed: int = 0,
    **settings: Any,
) -> Path:
    """Aligner stage alone: train on a store's reference spots and save ``config.json`` + safetensors.

    Parameters
    ----------
    store, encoder, cohort
        Where the reference embeddings and expression are.
    out
        Folder to write the aligner to; an existing aligner there is replaced, anything else refused.
    panel_method, n_genes
        Gene panel, chosen on this reference.
    group_by
        Unit held out for validation (see :func:`build_reference_index`).
    seed
        Training seed.
    **settings
        :class:`~embedstore.aligner.AlignerConfig` fields (``proj_dim``, ``max_epochs``, ...).
    """
    from embedstore import aligner as aligner_mod
    from embedstore._atomic import check_replaceable
    from embedstore.expression import apply_panel, normalize_log1p, select_panel

    # Refuse a bad out before training; save_aligner checks again before the swap.
    check_replaceable(out, aligner_mod.KIND, what="aligner checkpoint", overwrite=True, folder=True)
    _check_settings("mean", None, settings, "train_aligner")
    ref = load_reference(store, encoder, cohort=cohort)
    panel = select_panel(ref.counts, ref.genes, method=panel_method, n=n_genes)
    expr = apply_panel(normalize_log1p(ref.counts), ref.genes, panel)
    cfg = _aligner_config(settings, ref, panel)
    groups = ref.column(ref.group_column(group_by)).astype(str)
    with stage("training the aligner on %d spots x %d genes", len(expr), len(panel)):
        model = aligner_mod.fit(ref.embeddings, expr, groups if len(set(groups)) > 1 else None, cfg, seed)
    return aligner_mod.save_aligner(model, out)


def _fit_text_aligner(ref: Reference, settings: dict[str, Any], groups: np.ndarray, seed: int) -> Any:
    """Fine-tune the image and text heads on the reference's pairs (whole groups held out for validation)."""
    from embedstore.text_aligner import TextAlignerConfig, fit_text_aligner

    cfg = TextAlignerConfig.from_dict(
        {
            **settings,
            "encoder_name": ref.encoder.get("name", ""),
            "encoder_fingerprint": ref.encoder.get("fingerprint", ""),
            "text_fingerprint": (ref.text_encoder or {}).get("fingerprint", ""),
            "geometry": ref.encoder.get("geometry"),
        },
        where="text aligner settings",
    )
    with stage("fine-tuning the image and text heads on %d spot-sentence pairs", len(ref.embeddings)):
        return fit_text_aligner(ref.embeddings, ref.text, groups if len(set(groups)) > 1 else None, cfg, seed)


def _aligner_config(settings: dict[str, Any], ref: Reference, panel: Any) -> Any:
    """The aligner's config: the given settings plus what the reference fixes (encoder, geometry, genes)."""
    from embedstore import aligner as aligner_mod

    return aligner_mod.AlignerConfig.from_dict(
        {
            **settings,
            "encoder_name": ref.encoder.get("name", ""),
            "encoder_fingerprint": ref.encoder.get("fingerprint", ""),
            "geometry": ref.encoder.get("geometry"),
            "genes": list(panel.genes),
            "panel_method": panel.method,
        },
        where="aligner settings",
    )
