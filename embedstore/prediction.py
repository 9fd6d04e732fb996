"""The prediction stage: stored embeddings -> exemplar index kNN -> aggregation -> AnnData.

Output follows the prediction contract: ``X`` = predicted log-normalised expression,
``var`` = panel genes, ``obs`` = tiles (cohort, slide_id, tile_id, spot_id, x, y),
``obsm['spatial']`` = level-0 pixel centres, so scanpy and squidpy plot it like Visium.
Slides are predicted one at a time, so memory is bounded by the largest slide.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._atomic import atomic_file, check_replaceable
from embedstore._params import Str, validated
from embedstore._schema import OBSM_SPATIAL, UNS_KEY, Col
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

__all__ = ["predict", "prediction_anndata", "write_h5ad"]

OBS_COLUMNS = (Col.COHORT, Col.SLIDE_ID, Col.TILE_ID, Col.SPOT_ID, Col.X, Col.Y)


def prediction_anndata(values: np.ndarray, genes: Sequence[str], obs: Any, uns: dict[str, Any] | None = None) -> Any:
    """Wrap predictions as AnnData of the prediction contract.

    Parameters
    ----------
    values
        ``(n_tiles, n_genes)`` predicted log-normalised expression.
    genes
        Column names.
    obs
        pandas DataFrame or Arrow table with at least slide_id and x, y (level-0 px);
        tile_id, spot_id and cohort when known.
    uns
        Provenance stored under ``uns['embedstore']``.
    """
    import anndata as ad
    import pandas as pd

    df = obs.to_pandas() if hasattr(obs, "to_pandas") else pd.DataFrame(obs).copy()
    df = df.reset_index(drop=True)
    key = df[Col.TILE_ID] if Col.TILE_ID in df else df[Col.SPOT_ID]
    df.index = (df[Col.SLIDE_ID].astype(str) + ":" + key.astype(str)).to_numpy()
    for c in df.columns:
        if df[c].dtype == object or isinstance(df[c].dtype, pd.StringDtype):
            # h5ad string columns cannot hold None: a tile without a spot (or patient) gets ""
            df[c] = df[c].fillna("").astype(str)
    adata = ad.AnnData(
        X=np.asarray(values, dtype=np.float32),
        obs=df,
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")),
    )
    adata.obsm[OBSM_SPATIAL] = df[[Col.X, Col.Y]].to_numpy(dtype=np.float64)
    adata.uns[UNS_KEY] = dict(uns or {})
    return adata


PREDICTION_KIND = "prediction"
MAP_KIND = "figure"


def _h5ad_kind(path: Path) -> str | None:
    """``uns['embedstore']['kind']`` of an existing h5ad file, read with h5py (no full load)."""
    import h5py

    with h5py.File(path, "r") as f:
        node = f.get(f"uns/{UNS_KEY}/kind")
        value = node[()] if isinstance(node, h5py.Dataset) else None
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


def check_prediction_out(path: str | Path, overwrite: bool = True) -> None:
    """Refuse (:class:`BadInput`, nothing touched) an ``.h5ad`` path embedstore may not replace.

    An existing file is replaced only when it is an embedstore prediction.
    """
    check_replaceable(path, PREDICTION_KIND, what="prediction (.h5ad)", overwrite=overwrite, reader=_h5ad_kind)


def write_h5ad(adata: Any, path: str | Path, overwrite: bool = True) -> Path:
    """Write ``adata`` to ``path`` atomically, stamped ``uns['embedstore']['kind'] = "prediction"``.

    Parameters
    ----------
    adata
        Prediction AnnData (its ``uns['embedstore']`` gains the kind stamp).
    path
        ``.h5ad`` file. An existing file is replaced only when it is an embedstore prediction.
    overwrite
        Replace an existing prediction.

    Raises
    ------
    BadInput
        ``path`` holds something embedstore did not write, or lies in a store.
    DiskFull
        The disk ran out; no temporary file is left, an old file stays as it was.
    """
    import anndata as ad
    import h5py

    path = Path(path)
    check_prediction_out(path, overwrite)
    adata.uns[UNS_KEY] = {**dict(adata.uns.get(UNS_KEY, {})), "kind": PREDICTION_KIND}
    # HDF5 is encoded in memory, then written with plain file I/O: h5py left with a failed
    # write (full disk, file-size limit) prints tracebacks from its finalisers and can crash
    # the interpreter at exit, while a failed Python write is one clean OSError.
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        ad.io.write_elem(f, "/", adata)
    with atomic_file(path, size_hint=buf.getbuffer().nbytes) as tmp:
        tmp.write_bytes(buf.getbuffer())
    return path


@validated(aggregator=Str())
def predict(
    index: str | Path | Any,
    store: str | Path | Any,
    slide_ids: Sequence[str] | None = None,
    cohort: str | None = None,
    *,
    k: int | None = None,
    aggregator: str | None = None,
    exclude_own: str | None = None,
    out: str | Path | None = None,
    plot: bool = False,
    image: str | Path | None = None,
) -> Any:
    """Predict expression for stored tiles with an exemplar index.

    Parameters
    ----------
    index
        Index folder (or a loaded :class:`~embedstore.index.ExemplarIndex`).
    store
        Store (or its path) holding the query tiles' embeddings from the index's encoder.
    slide_ids, cohort
        Selection; every slide of the encoder by default.
    k
        Neighbours; the index's own by default.
    aggregator
        ``"mean"``, ``"softmax"``, ``"idw"`` or ``None`` for the index's own (possibly learned).
    exclude_own
        ``"slide_id"`` or ``"patient"``: leave the query's own slide/patient out of retrieval
        (evaluation on the reference without leakage).
    out
        ``.h5ad`` file to write (atomically).
    plot
        Also write maps of the most variable predicted genes next to ``out``
        (``<out>.<slide>.png``), over ``image`` when given.
    image
        The slide image for the maps' background (one slide).

    Returns
    -------
    AnnData of the prediction contract.
    """
    import anndata as ad

    from embedstore.index import load_index
    from embedstore.store import open_store

    idx = load_index(index) if isinstance(index, str | Path) else index
    st = open_store(store) if isinstance(store, str | Path) else store
    encoder = idx.manifest["embedstore.encoder"].get("name")
    if not encoder:
        msg = f"{index}: the index manifest names no encoder; rebuild the index"
        raise BadInput(msg)
    if encoder not in st.encoders():
        msg = f"{st.root}: no embeddings from encoder {encoder!r} (the index's); embed the slides with --encoder {encoder}"
        raise BadInput(msg)
    k = int(k or idx.manifest.get("k", 50))
    _check_k_and_aggregator(idx, k, aggregator)
    if aggregator == idx.manifest["aggregator"]["name"]:
        aggregator = None  # the index's own, with the parameters it was built with
    slides = list(slide_ids) if slide_ids else _slides(st, encoder, cohort)
    if out is not None:  # refuse a bad output before computing anything
        check_prediction_out(out)
        for slide in slides if plot else ():
            check_replaceable(_map_path(Path(out), slide), MAP_KIND, what="prediction map (.png)", option="--out")
    parts = []
    # One row group (~64 MiB of vectors) at a time: memory does not grow with the slide. Every
    # file's fingerprint and tile geometry are checked against the index's before the first chunk.
    chunks = st.iter_embeddings(
        encoder, cohort=cohort, slide_ids=slides, fingerprint=idx.fingerprint or None, geometry=idx.geometry
    )
    for meta, emb in chunks:
        if not len(emb):
            continue
        groups = None
        if exclude_own == Col.SLIDE_ID:
            groups = meta.column(Col.SLIDE_ID).to_numpy(zero_copy_only=False)
        elif exclude_own:
            groups = _patients(st, meta)
        values = idx.predict(
            emb, k=k, aggregator=aggregator, query_groups=groups, group_by=exclude_own or Col.SLIDE_ID,
            fingerprint=meta.column(Col.FINGERPRINT)[0].as_py(),
        )  # fmt: skip
        obs = meta.select([c for c in OBS_COLUMNS if c in meta.column_names])
        parts.append(prediction_anndata(values, idx.genes, obs))
        LOG.info("predicted %d tiles of %s", len(emb), meta.column(Col.SLIDE_ID)[0].as_py())
    if not parts:
        msg = f"{st.root}: the selected slides ({', '.join(slides[:5])}) hold no tiles of encoder {encoder!r}; embed them again"
        raise BadInput(msg)
    adata = ad.concat(parts, merge="same") if len(parts) > 1 else parts[0]
    adata.uns[UNS_KEY] = {
        "index": str(index) if isinstance(index, str | Path) else "",
        "encoder": idx.manifest["embedstore.encoder"],
        "k": k,
        "aggregator": aggregator or idx.manifest["aggregator"]["name"],
        "n_exemplars": len(idx),
    }
    if out is not None:
        write_h5ad(adata, out)
        if plot:
            _plot(adata, Path(out), image)
    return adata


def _check_k_and_aggregator(idx: Any, k: int, aggregator: str | None) -> None:
    """Refuse a k beyond the index and an aggregator name that is not registered or not in the index."""
    from embedstore.aggregate import AGGREGATORS

    if k > len(idx):
        msg = f"k={k} (--k): larger than the index's {len(idx)} exemplars; pass --k {len(idx)} or less"
        raise BadInput(msg)
    if aggregator is None:
        return
    AGGREGATORS.get(aggregator)  # an unknown name lists the close matches
    own = idx.manifest["aggregator"]["name"]
    if aggregator == "learned" and own != "learned":
        msg = f"aggregator='learned' (--aggregator): this index's aggregator is {own!r}; build an index whose recipe has aggregator name = \"learned\", or use mean, softmax or idw"
        raise BadInput(msg)


def _slides(st: Any, encoder: str, cohort: str | None) -> list[str]:
    where = "WHERE encoder = ?" + (" AND cohort = ?" if cohort else "")
    params = [encoder, cohort] if cohort else [encoder]
    df = st.sql(f"SELECT DISTINCT slide_id FROM slides {where} ORDER BY slide_id", params=params)
    if df.empty:
        msg = f"{st.root}: no slides for encoder {encoder!r}{f' in cohort {cohort!r}' if cohort else ''}; embed them first"
        raise BadInput(msg)
    return df.slide_id.tolist()


def _patients(st: Any, meta: Any) -> np.ndarray:
    """Patient of each tile, from the store's spots table."""
    spots = st.sql("SELECT slide_id, spot_id, patient FROM spots", output="pandas")
    lookup = {(s, p): pt for s, p, pt in spots.itertuples(index=False)}
    out = [
        lookup.get((s, p))
        for s, p in zip(meta.column(Col.SLIDE_ID).to_pylist(), meta.column(Col.SPOT_ID).to_pylist(), strict=True)
    ]
    if any(v is None for v in out):
        msg = "exclude_own='patient': some tiles have no patient in the store's spots table; use exclude_own='slide_id'"
        raise BadInput(msg)
    return np.asarray(out, dtype=str)


def _plot(adata: Any, out: Path, image: str | Path | None) -> None:
    from embedstore.report import plot_prediction_maps

    thumb, scale = None, 1.0
    if image is not None:
        from embedstore.slides import open_slide

        with open_slide(image, mpp=1.0) as slide:  # µm/px is irrelevant for a thumbnail
            thumb = slide.thumbnail(1024)
            scale = thumb.size[0] / slide.dimensions[0]
    variable = np.argsort(-np.asarray(adata.X).var(axis=0))[:4]
    genes = [adata.var_names[i] for i in variable]
    for slide in adata.obs[Col.SLIDE_ID].unique():
        sub = adata[adata.obs[Col.SLIDE_ID] == slide]
        plot_prediction_maps(sub, thumb, scale, genes, _map_path(out, slide))


def _map_path(out: Path, slide: str) -> Path:
    """``<out>.<slide>.png`` beside the prediction file."""
    return out.with_suffix(f".{slide}.png")
