"""FAISS index over reference exemplars in the aligned space, in memory.

Vectors are L2-normalised and searched by inner product (= cosine similarity). Any FAISS
factory string works; :func:`default_factory` picks one by reference size (from
``scripts/bench_knn.py``) and :func:`build_tuned` chooses its codec and nprobe for a target
recall at the index's k, recorded in the manifest's ``search``. An :class:`ExemplarIndex`
bundles the FAISS index with the exemplars' ids and expression, the gene panel, the aligner
and a manifest, and predicts expression for new image embeddings in bounded-memory batches.
The index folder on disk is :mod:`embedstore.index_folder`.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._knn import (
    BATCH_ENTRIES,
    build,
    build_tuned,
    default_factory,
    default_nprobe,
    gpu_available,
    search,
    set_search_params,
    tune_search,
)
from embedstore._ondisk import build_ondisk_from_array, choose_layout, parse_memory_budget
from embedstore._params import Choice, validated
from embedstore._progress import stage
from embedstore._schema import (
    META_ENCODER,
    META_KIND,
    META_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Col,
    check_fingerprint,
    check_geometry,
    parse_geometry,
)
from embedstore._vectors import l2_normalize
from embedstore.aggregate import (
    Aggregator,
    LearnedAggregator,
    create_aggregator,
    fit_learned_aggregator,
)
from embedstore.errors import BadInput
from embedstore.expression import Panel

LOG = logging.getLogger(__name__)

KIND = "exemplar_index"  # the manifest's kind
KEYS = ("expression", "image", "text")
AGGREGATOR_DIR = "aggregator"  # where the manifest says a learned aggregator is kept, relative to the folder

__all__ = [
    "ExemplarIndex",
    "build",
    "build_exemplar_index",
    "build_tuned",
    "default_factory",
    "default_nprobe",
    "gpu_available",
    "l2_normalize",
    "search",
    "set_search_params",
    "tune_search",
]


class ExemplarIndex:
    """Exemplars of a reference cohort in the aligned space, ready to predict expression.

    Attributes
    ----------
    index
        The faiss index over ``key_vectors`` (row i = exemplar i).
    exemplars
        Arrow table: slide_id, spot_id, patient of each exemplar.
    expression
        (n, G) float32 log-normalised expression over ``panel``.
    key_vectors
        (n, dim) float32 L2-normalised keys (projected expression, image embeddings, or the
        text embeddings of the exemplars' gene sentences).
    panel
        The :class:`~embedstore.expression.Panel`.
    aligner
        The :class:`~embedstore.aligner.Aligner` (or, for text keys, the fine-tuned
        :class:`~embedstore.text_aligner.TextAligner`), or None: raw image embeddings (or
        zero-shot image-text similarity, for text keys) are searched.
    aggregator
        Default aggregator of :meth:`predict`.
    manifest
        What the directory's manifest.json holds.
    """

    def __init__(self, index, exemplars, expression, key_vectors, panel, aligner, aggregator, manifest) -> None:
        self.index, self.exemplars, self.expression = index, exemplars, expression
        self.key_vectors, self.panel, self.aligner = key_vectors, panel, aligner
        self.aggregator, self.manifest = aggregator, manifest

    @property
    def genes(self) -> list[str]:
        """Panel genes, the columns of every prediction."""
        return list(self.panel.genes)

    @property
    def fingerprint(self) -> str:
        """Encoder fingerprint the index expects of query embeddings ('' if not recorded)."""
        return str(self.manifest[META_ENCODER].get("fingerprint", ""))

    @property
    def geometry(self) -> dict[str, Any] | None:
        """Tile geometry (µm/px, tile px, resampling) the index expects of query embeddings (None if not recorded)."""
        return parse_geometry(
            self.manifest[META_ENCODER].get("geometry"), f"index manifest key {META_ENCODER}.geometry"
        )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def check_panel(self, genes: Any, where: str = "expression data") -> None:
        """Raise BadInput naming both sides when ``genes`` differ from the index panel."""
        genes = [str(g) for g in genes]
        if genes != self.genes:
            only_q = [g for g in genes if g not in set(self.genes)][:5]
            only_i = [g for g in self.genes if g not in set(genes)][:5]
            msg = (
                f"{where}: gene panel ({len(genes)} genes, e.g. not in index: {only_q}) differs from the index panel "
                f"({len(self.genes)} genes, e.g. not in data: {only_i}){' (same genes, other order)' if set(genes) == set(self.genes) else ''}; "
                "apply the index's panel with expression.apply_panel"
            )
            raise BadInput(msg)

    def check_query(
        self,
        image_emb: np.ndarray,
        fingerprint: str | None = None,
        where: str = "query embeddings",
        geometry: dict[str, Any] | None = None,
    ) -> None:
        """Raise when ``image_emb`` has the wrong width, or ``fingerprint`` or ``geometry`` differ from the index's.

        Raises
        ------
        BadInput
            The width is not the index's input width.
        FingerprintMismatch
            Another encoder, weights or preprocessing.
        GeometryMismatch
            Tiles at another µm/px, size or resampling (a subclass of FingerprintMismatch).
        """
        emb = np.asarray(image_emb)
        want = int(self.manifest["input_dim"])
        if emb.ndim != 2 or emb.shape[1] != want:
            msg = (
                f"{where}: shape {emb.shape}, but the index was built from {want}-d embeddings "
                f"({self.manifest[META_ENCODER].get('name', 'unknown encoder')}); embed with the same encoder"
            )
            raise BadInput(msg)
        if fingerprint is not None and self.fingerprint:
            check_fingerprint(self.fingerprint, fingerprint, where)
        # one encoder at two tilings gives one fingerprint but embeddings that do not compare
        check_geometry(self.geometry, parse_geometry(geometry, f"{where} geometry"), where)

    def query_keys(
        self, image_emb: np.ndarray, fingerprint: str | None = None, where: str = "query embeddings"
    ) -> np.ndarray:
        """Image embeddings -> L2-normalised query vectors of the index space (checks dim, fingerprint)."""
        emb = np.asarray(image_emb, dtype=np.float32)
        self.check_query(emb, fingerprint, where)
        return self.aligner.project_images(emb) if self.aligner is not None else l2_normalize(emb)

    def _groups(self, group_by: str) -> np.ndarray:
        if group_by not in (Col.SLIDE_ID, Col.PATIENT):
            msg = f"group_by={group_by!r}: use {Col.SLIDE_ID!r} or {Col.PATIENT!r}"
            raise BadInput(msg)
        g = self.exemplars.column(group_by).to_numpy(zero_copy_only=False)
        if group_by == Col.PATIENT and any(v is None for v in g):
            msg = "group_by='patient': some exemplars have no patient recorded; exclude by slide_id instead"
            raise BadInput(msg)
        return g.astype(str)

    def retrieve(
        self,
        image_emb: np.ndarray,
        k: int,
        query_groups: np.ndarray | None = None,
        group_by: str = Col.SLIDE_ID,
        fingerprint: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query keys (N, dim), sims (N, k) and exemplar ids (N, k); own-group exemplars excluded if ``query_groups``."""
        keys = self.query_keys(image_emb, fingerprint)
        exclude = None if query_groups is None else (self._groups(group_by), np.asarray(query_groups).astype(str))
        sims, ids = search(self.index, keys, k, exclude)
        return keys, sims, ids

    @validated(group_by=Choice(Col.SLIDE_ID, Col.PATIENT))
    def predict(
        self,
        image_emb: np.ndarray,
        k: int = 50,
        aggregator: str | Aggregator | None = None,
        query_groups: np.ndarray | None = None,
        *,
        group_by: str = Col.SLIDE_ID,
        batch_size: int = 4096,
        fingerprint: str | None = None,
        geometry: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """Predicted log-normalised expression (N, len(genes)) float32 for new image embeddings.

        Parameters
        ----------
        image_emb
            (N, D) embeddings from the index's encoder.
        k
            Neighbours per query.
        aggregator
            A registered name (``"mean"``, ``"softmax"``, ``"idw"``; ``"learned"`` is the
            index's own learned aggregator), an :class:`Aggregator`, or None for the index's default.
        query_groups
            (N,) slide ids (or patients, with ``group_by="patient"``) of the queries: exemplars
            of the same group are excluded (leave-slide-out prediction on the reference).
        batch_size
            Queries per FAISS search (4,096 or more keeps FAISS on its fast BLAS path); the
            gather and aggregation that follow go in smaller steps, under ~64 MB of
            neighbour expression each.
        fingerprint
            Encoder fingerprint of ``image_emb``; checked against the manifest when given.
        geometry
            Tile geometry of ``image_emb`` (:func:`embedstore._schema.geometry`); checked
            against the manifest when given.
        """
        agg = self.resolve_aggregator(aggregator)
        emb = np.asarray(image_emb, dtype=np.float32)
        self.check_query(emb, fingerprint, geometry=geometry)  # once, before any work
        qg = None if query_groups is None else np.asarray(query_groups).astype(str)
        if qg is not None and len(qg) != len(emb):
            msg = f"query_groups: {len(qg)} values for {len(emb)} queries; give one per query"
            raise BadInput(msg)
        ex_groups = None if qg is None else self._groups(group_by)
        # Only the gather + aggregation is sized by memory: a search of that many rows (167 at
        # 2,000 genes) falls below FAISS's BLAS threshold onto its slow path (predict 3-4x slower).
        width = max(len(self.genes), self.key_vectors.shape[1] if agg.needs_keys else 1)
        step = max(1, min(batch_size, BATCH_ENTRIES // (k * width)))
        out = np.empty((len(emb), len(self.genes)), dtype=np.float32)
        for s in range(0, len(emb), batch_size):
            sl = slice(s, s + batch_size)
            keys = self.query_keys(emb[sl])
            sims, ids = search(self.index, keys, k, None if qg is None else (ex_groups, qg[sl]))
            if (ids < 0).any():
                msg = f"index: found fewer than k={k} neighbours for some queries; raise nprobe/efSearch or lower k"
                raise BadInput(msg)
            for a in range(0, len(keys), step):
                part = slice(a, min(a + step, len(keys)))
                nk = self.key_vectors[ids[part]] if agg.needs_keys else None
                out[s + part.start : s + part.stop] = agg(
                    sims[part], self.expression[ids[part]], query_keys=keys[part], neighbour_keys=nk
                )
        return out

    def resolve_aggregator(self, aggregator: str | Aggregator | None) -> Aggregator:
        """The aggregator :meth:`predict` uses for ``aggregator`` (a name, an instance or None).

        ``"learned"`` names the index's own trained aggregator: it has weights, so the registry
        alone cannot build one.
        """
        if aggregator is None:
            return self.aggregator
        if not isinstance(aggregator, str):
            return aggregator
        if aggregator == "learned":
            if isinstance(self.aggregator, LearnedAggregator):
                return self.aggregator
            msg = (
                f"aggregator='learned' (--aggregator): this index has no learned aggregator (its own is "
                f'{self.aggregator.name!r}); rebuild it with a recipe whose [aggregator] name = "learned", '
                "or use mean, softmax, idw or loki"
            )
            raise BadInput(msg)
        return create_aggregator(aggregator)

    def fit_learned_aggregator(
        self, image_emb: np.ndarray, k: int = 50, cfg: Any = None, seed: int = 0, group_by: str = Col.SLIDE_ID
    ) -> LearnedAggregator:
        """Train the EGN-style aggregator on the reference itself and make it the default.

        ``image_emb`` are the exemplars' own image embeddings (row i = exemplar i); each one's
        neighbours are retrieved with its own slide (or patient) excluded, as for a new slide.
        """
        emb = np.asarray(image_emb, dtype=np.float32)
        if len(emb) != len(self):
            msg = f"image_emb: {len(emb)} rows, but the index has {len(self)} exemplars; pass the reference's embeddings in exemplar order"
            raise BadInput(msg)
        groups = self._groups(group_by)
        keys, sims, ids = self.retrieve(emb, k, groups, group_by)
        agg = fit_learned_aggregator(
            keys, self.key_vectors[ids], self.expression[ids], sims, self.expression, cfg, seed
        )
        self.aggregator = agg
        self.manifest["aggregator"] = {"name": "learned", "params": {"path": AGGREGATOR_DIR}}
        return agg


def build_exemplar_index(
    image_emb: np.ndarray,
    expression: np.ndarray,
    panel: Panel,
    slide_ids: Any,
    spot_ids: Any,
    patients: Any = None,
    *,
    aligner: Any = None,
    keys: str = "expression",
    text_emb: np.ndarray | None = None,
    text_encoder: dict[str, Any] | None = None,
    factory: str | None = None,
    encoder: dict[str, Any] | None = None,
    aggregator: str | Aggregator = "mean",
    device: str = "auto",
    nprobe: int | None = None,
    efSearch: int | None = None,
    seed: int = 0,
    k: int = 50,
    target_recall: float = 0.95,
    layout: str = "auto",
    memory_budget: int | str | None = None,
    scratch_dir: str | Path | None = None,
) -> ExemplarIndex:
    """Build an :class:`ExemplarIndex` from a reference cohort's spots.

    Parameters
    ----------
    image_emb
        (n, D) image embeddings of the reference spots.
    expression
        (n, G) log-normalised expression over ``panel``.
    panel
        The gene panel (chosen on this reference).
    slide_ids, spot_ids, patients
        Per-spot ids stored in exemplars.parquet (``patients`` may be None).
    aligner
        A trained aligner; None builds the "kNN on raw embeddings" baseline (``keys="image"``)
        or zero-shot Loki (``keys="text"``). With ``keys="text"`` it is a
        :class:`~embedstore.text_aligner.TextAligner`.
    keys
        ``"expression"`` (BLEEP: keys are projected expression), ``"image"`` (EGN: keys are
        the (projected) image embeddings) or ``"text"`` (Loki: keys are the text embeddings of
        the exemplars' gene sentences, queried with image embeddings).
    text_emb, text_encoder
        For ``keys="text"``: (n, D) text embeddings of the exemplars' gene sentences, and the
        metadata of the text table they come from (recorded in the manifest).
    factory
        FAISS factory string; None chooses by size and tunes the codec (:func:`build_tuned`).
    encoder
        Encoder metadata (name, fingerprint, tile ``geometry``, ...) written to the manifest and
        checked on queries.
    aggregator
        Default aggregator: a registered name or an :class:`Aggregator`.
    device, seed
        Passed to :func:`build_tuned`.
    nprobe
        IVF lists probed; None chooses the smallest reaching ``target_recall`` at ``k``.
    efSearch
        HNSW beam width, for an HNSW factory.
    k, target_recall
        The prediction's k (the recipe's ``[aggregator] k``) and the recall@k the search
        settings must reach on held-out exemplars; the settings and the recall reached go
        into ``manifest["search"]``.
    layout, memory_budget
        ``"auto"``: the FAISS index's inverted lists on disk when the keys do not fit in
        ``memory_budget`` (bytes or text such as ``"8GB"``; None: half the available memory),
        ``"memory"`` or ``"ondisk"`` to force one (:mod:`embedstore._ondisk`). On disk the index
        is IVF (``IVF{nlist},SQ8`` for ``factory=None``), trained on a sample and filled shard by
        shard; :func:`~embedstore.index_folder.save_index` writes its lists as ``index.ivfdata``
        and :func:`~embedstore.index_folder.load_index` maps them.
    scratch_dir
        Where the on-disk lists are built before the index is saved (default: the system's
        temporary folder); choose one on the disk the index will be saved to.
    """
    emb = np.asarray(image_emb, dtype=np.float32)
    expr = np.asarray(expression, dtype=np.float32)
    n = len(emb)
    if emb.ndim != 2 or expr.shape != (n, len(panel)):
        msg = f"build_exemplar_index: image_emb {emb.shape} and expression {expr.shape} must be (n, D) and (n, {len(panel)} panel genes)"
        raise BadInput(msg)
    cols = {
        Col.SLIDE_ID: slide_ids,
        Col.SPOT_ID: spot_ids,
        Col.PATIENT: patients if patients is not None else [None] * n,
    }
    for name, v in cols.items():
        if len(v) != n:
            msg = f"build_exemplar_index: {name} has {len(v)} values for {n} exemplars"
            raise BadInput(msg)
    if keys not in KEYS:
        msg = f"keys={keys!r}: use 'expression' (BLEEP), 'image' (EGN) or 'text' (Loki)"
        raise BadInput(msg)
    encoder = dict(encoder or {})
    if keys == "text":
        key_vectors = _text_keys(emb, text_emb, aligner, encoder)
    elif aligner is None:
        if keys == "expression":
            msg = "keys='expression': needs a trained aligner; pass aligner=... or keys='image' for the raw-embedding baseline"
            raise BadInput(msg)
        key_vectors = l2_normalize(emb)
    else:
        cfg = aligner.config
        if cfg.genes and tuple(cfg.genes) != panel.genes:
            msg = f"aligner: trained on a {len(cfg.genes)}-gene panel ({list(cfg.genes)[:5]}...) but the index panel has {len(panel)} genes ({list(panel.genes)[:5]}...); train the aligner on this panel"
            raise BadInput(msg)
        if cfg.encoder_fingerprint and encoder.get("fingerprint"):
            check_fingerprint(cfg.encoder_fingerprint, encoder["fingerprint"], "build_exemplar_index embeddings")
        # the aligner learnt its projection on tiles of one geometry; other tilings are other inputs
        found = parse_geometry(encoder.get("geometry"), "build_exemplar_index encoder geometry")
        check_geometry(cfg.geometry, found, "build_exemplar_index embeddings")
        encoder.setdefault("fingerprint", cfg.encoder_fingerprint)
        encoder.setdefault("name", cfg.encoder_name)
        if cfg.geometry is not None:
            encoder.setdefault("geometry", cfg.geometry)
        key_vectors = aligner.project_expression(expr) if keys == "expression" else aligner.project_images(emb)
    if choose_layout(n, key_vectors.shape[1], layout, parse_memory_budget(memory_budget)) == "ondisk":
        # the lists live in a scratch folder until save_index copies them; removed with the index
        scratch = tempfile.TemporaryDirectory(prefix="embedstore-index-", dir=scratch_dir)
        with stage("FAISS index with on-disk lists: training it and adding %d exemplars in shards", n):
            index, settings = build_ondisk_from_array(
                key_vectors, Path(scratch.name), factory, memory_budget=memory_budget, k=k,
                target_recall=target_recall, nprobe=nprobe, seed=seed,
            )  # fmt: skip
        index.referenced_objects = [scratch]
    else:
        shown = factory or default_factory(n, key_vectors.shape[1])
        with stage("FAISS %s index: training it and adding %d exemplars", shown, n):
            index, settings = build_tuned(
                key_vectors, factory, k=k, target_recall=target_recall, nprobe=nprobe, device=device, seed=seed
            )
    if efSearch is not None:
        set_search_params(index, efSearch=efSearch)
    agg = create_aggregator(aggregator) if isinstance(aggregator, str) else aggregator
    from embedstore import __version__

    manifest = {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_KIND: KIND,
        META_ENCODER: encoder,
        "factory": settings["factory"],
        "search": settings,
        "metric": "ip",
        "keys": keys,
        **({"text_encoder": dict(text_encoder or {})} if keys == "text" else {}),
        "aligned": aligner is not None,
        "n": n,
        "dim": int(key_vectors.shape[1]),
        "input_dim": int(emb.shape[1]),
        "n_genes": len(panel),
        "aggregator": {"name": agg.name, "params": {"path": AGGREGATOR_DIR} if agg.needs_keys else agg.params},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "embedstore_version": __version__,
    }
    table = pa.table(
        {name: pa.array([None if v is None else str(v) for v in vals], pa.string()) for name, vals in cols.items()}
    )
    return ExemplarIndex(index, table, expr, key_vectors, panel, aligner, agg, manifest)


def _text_keys(image_emb: np.ndarray, text_emb: np.ndarray | None, aligner: Any, encoder: dict[str, Any]) -> np.ndarray:
    """Loki's keys: the exemplars' text embeddings, through the fine-tuned text head when there is one."""
    n = len(image_emb)
    text = None if text_emb is None else np.asarray(text_emb, dtype=np.float32)
    if text is None or text.ndim != 2 or len(text) != n:
        shape = None if text is None else text.shape
        msg = f"keys='text': needs text_emb, the (n={n}, D) text embeddings of the exemplars' gene sentences (got {shape}); run embedstore embed-text first"
        raise BadInput(msg)
    if aligner is None:
        if text.shape[1] != image_emb.shape[1]:
            msg = f"keys='text': text embeddings of dim {text.shape[1]} and image embeddings of dim {image_emb.shape[1]} are not one space; embed both with the same CLIP/CoCa checkpoint"
            raise BadInput(msg)
        return l2_normalize(text)
    cfg = aligner.config
    if not hasattr(aligner, "project_text"):
        msg = "keys='text': the aligner given is an image-expression aligner; pass a text aligner (embedstore.text_aligner) or none"
        raise BadInput(msg)
    if cfg.encoder_fingerprint and encoder.get("fingerprint"):
        check_fingerprint(cfg.encoder_fingerprint, encoder["fingerprint"], "build_exemplar_index embeddings")
    check_geometry(
        cfg.geometry,
        parse_geometry(encoder.get("geometry"), "build_exemplar_index encoder geometry"),
        "build_exemplar_index embeddings",
    )
    encoder.setdefault("fingerprint", cfg.encoder_fingerprint)
    encoder.setdefault("name", cfg.encoder_name)
    return aligner.project_text(text)
