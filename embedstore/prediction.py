"""The prediction stage: stored embeddings -> exemplar index kNN -> aggregation -> AnnData.

The prediction contract, one AnnData for ``predict``, ``evaluate`` and ``demo``:

- ``X``: predicted log-normalised expression (float32), ``var_names``: the panel genes;
- ``obs``: one row per tile with exactly :data:`OBS_COLUMNS`: ``cohort``, ``slide_id``
  (categorical: the library key, ``library_key="slide_id"`` in squidpy), ``patient``,
  ``tile_id``, ``spot_id`` (``""`` where unknown: a grid tile has no spot, a plain slide no
  patient), ``x``, ``y`` (level-0 pixel centre);
- ``obsm['spatial']``: ``(x, y)`` level-0 pixel centres;
- ``uns['spatial'][slide_id]``: the Visium convention of scanpy and squidpy, the slide's H&E
  (``images``: ``hires`` at most 2000 px, ``lowres`` at most 600 px, uint8 RGB), its
  ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``: image px per level-0 px;
  ``spot_diameter_fullres``: the ST spot, or the tile side, in level-0 px) and ``metadata``;
- ``uns['embedstore']``: provenance (index, encoder, k, aggregator).

So ``sc.pl.spatial(adata, color=gene)`` draws one slide's prediction over its H&E (with several
slides: ``library_id=slide``), and ``sq.pl.spatial_scatter(adata, color=gene,
library_key="slide_id")`` draws all of them. Slides are read one row group at a time, so
memory is bounded by the output, not by the input embeddings.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._atomic import atomic_file, check_replaceable
from embedstore._params import Str, validated
from embedstore._schema import OBSM_SPATIAL, UNS_KEY, Col
from embedstore.errors import BadInput, EmbedstoreError

LOG = logging.getLogger(__name__)

__all__ = ["OBS_COLUMNS", "predict", "prediction_anndata", "spatial_libraries", "write_h5ad"]

OBS_COLUMNS = (Col.COHORT, Col.SLIDE_ID, Col.PATIENT, Col.TILE_ID, Col.SPOT_ID, Col.X, Col.Y)
_TEXT_COLUMNS = (Col.COHORT, Col.PATIENT, Col.TILE_ID, Col.SPOT_ID)
UNS_SPATIAL = "spatial"  # scanpy/squidpy: uns['spatial'][library_id] = {images, scalefactors, metadata}
HIRES_PX = 2000  # longer side of the hires image, as Space Ranger's tissue_hires_image.png
LOWRES_PX = 600  # longer side of the lowres image, as Space Ranger's tissue_lowres_image.png


def prediction_anndata(
    values: np.ndarray,
    genes: Sequence[str],
    obs: Any,
    uns: dict[str, Any] | None = None,
    spatial: dict[str, Any] | None = None,
) -> Any:
    """Wrap predictions as AnnData of the prediction contract (see the module docstring).

    Parameters
    ----------
    values
        ``(n_tiles, n_genes)`` predicted log-normalised expression.
    genes
        Column names.
    obs
        pandas DataFrame or Arrow table with at least slide_id and x, y (level-0 px); the
        other :data:`OBS_COLUMNS` are ``""`` when absent, further columns are dropped.
    uns
        Provenance stored under ``uns['embedstore']``.
    spatial
        ``uns['spatial']``: :func:`spatial_libraries` of the slides (none by default).
    """
    import anndata as ad
    import pandas as pd

    df = obs.to_pandas() if hasattr(obs, "to_pandas") else pd.DataFrame(obs).copy()
    df = df.reset_index(drop=True)
    missing = [c for c in (Col.SLIDE_ID, Col.X, Col.Y) if c not in df]
    if missing:
        msg = f"prediction obs: no column(s) {', '.join(missing)}; give each tile's slide_id and level-0 centre x, y"
        raise BadInput(msg)
    for c in _TEXT_COLUMNS:
        # h5ad string columns cannot hold None: a tile without a spot (or patient) gets ""
        df[c] = df[c].fillna("").astype(str) if c in df else ""
    df = df[list(OBS_COLUMNS)]
    key = df[Col.TILE_ID].where(df[Col.TILE_ID] != "", df[Col.SPOT_ID])
    df.index = (df[Col.SLIDE_ID].astype(str) + ":" + key).to_numpy()
    df[Col.SLIDE_ID] = pd.Categorical(df[Col.SLIDE_ID].astype(str))
    adata = ad.AnnData(
        X=np.asarray(values, dtype=np.float32),
        obs=df,
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")),
    )
    adata.obsm[OBSM_SPATIAL] = df[[Col.X, Col.Y]].to_numpy(dtype=np.float64)
    adata.uns[UNS_SPATIAL] = dict(spatial or {})
    adata.uns[UNS_KEY] = dict(uns or {})
    return adata


def spatial_libraries(
    store: str | Path | Any, encoder: str, slides: Iterable[tuple[str, str]], hires: bool = True
) -> dict[str, Any]:
    """``uns['spatial']`` for predicted slides: each one's downscaled H&E and scale factors.

    The image is read from the source recorded when the slide was embedded: the slide file,
    or the section's image in its ST data set. A slide whose source is gone (or unreadable)
    gets no entry, and one warning names all such slides.

    Parameters
    ----------
    store
        Store (or its path) the slides were embedded into.
    encoder
        The encoder whose embedding recorded the source.
    slides
        ``(cohort, slide_id)`` pairs.
    hires
        Also keep the ~2,000 px ``hires`` image (scanpy draws ``lowres`` when there is none).

    Returns
    -------
    ``{slide_id: {"images": {"hires", "lowres"}, "scalefactors": {...}, "metadata": {...}}}``.
    """
    from embedstore.store import open_store

    st = open_store(store) if isinstance(store, str | Path) else store
    sections: dict[str, dict[str, dict[str, Any]]] = {}  # ST data set -> slide id -> reader's uns['embedstore']
    libraries, missing = {}, []
    for cohort, slide_id in slides:
        try:
            libraries[slide_id] = _library(st, encoder, cohort, slide_id, sections, hires)
        except EmbedstoreError as e:
            missing.append(f"{slide_id} ({e})")
    if missing:
        LOG.warning(
            "no H&E image for slide(s) %s: their predictions have no image in uns['spatial']; "
            "put the source back where it was embedded from, or plot with spot_size=...",
            "; ".join(missing),
        )
    return libraries


def _library(
    st: Any, encoder: str, cohort: str, slide_id: str, sections: dict[str, Any], hires: bool
) -> dict[str, Any]:
    """One slide's ``uns['spatial']`` entry, from its recorded source (BadInput when the image cannot be read)."""
    from PIL import Image

    from embedstore.slides import open_slide
    from embedstore.spots import read_dataset

    src = st.slide_source(encoder, cohort, slide_id)
    if not src:
        msg = "the store does not record where it was embedded from"
        raise BadInput(msg)
    data, mpp, spot_um = Path(src["data"]), src.get("mpp"), None
    if not data.exists():
        msg = f"its source {data} is gone"
        raise BadInput(msg)
    if src.get("kind") == "st" and src.get("image"):  # recorded at embedding
        image, spot_um = Path(src["image"]), src.get("spot_diameter_um")
    elif src.get("kind") == "st":  # a store embedded before images were recorded: read the data set
        if str(data) not in sections:
            sections[str(data)] = {s.uns[UNS_KEY]["slide_id"]: s.uns[UNS_KEY] for s in read_dataset(data, join=None)}
        info = sections[str(data)].get(slide_id) or {}
        if not info.get("image_path"):
            msg = f"{data} holds no image of section {slide_id}"
            raise BadInput(msg)
        image, mpp, spot_um = Path(info["image_path"]), mpp or info["mpp"], info["spot_diameter_um"]
    else:
        image = data
    with open_slide(image, mpp=mpp, slide_id=slide_id) as slide:
        mpp, full = slide.mpp, max(slide.dimensions)
        large = slide.thumbnail(HIRES_PX)
    lowres = large.copy()
    lowres.thumbnail((LOWRES_PX, LOWRES_PX), Image.Resampling.BILINEAR)
    if spot_um:  # the measured spot
        diameter = spot_um / mpp
    else:  # a grid tile: its side
        geom = st.encoder_metadata(encoder, cohort, [slide_id])["geometry"]
        diameter = geom["size_px"] * geom["mpp"] / mpp
    images = {"lowres": np.asarray(lowres, dtype=np.uint8)}
    scalefactors = {"tissue_lowres_scalef": max(lowres.size) / full, "spot_diameter_fullres": float(diameter)}
    if hires:
        images["hires"] = np.asarray(large, dtype=np.uint8)
        scalefactors["tissue_hires_scalef"] = max(large.size) / full
    return {
        "images": images,
        "scalefactors": scalefactors,
        "metadata": {"source_image_path": str(image), "mpp": float(mpp)},
    }


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
        # gzip (level 1): the H&E images in uns['spatial'] shrink about 3x, at ~0.15 s per 2,000 px image
        ad.io.write_elem(f, "/", adata, dataset_kwargs={"compression": "gzip", "compression_opts": 1})
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
    images: bool = True,
    out: str | Path | None = None,
    plot: bool = False,
    smooth: bool = False,
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
        ``"slide_id"``: leave the exemplars of the query's own slide out of retrieval;
        ``"patient"``: those of every slide of its patient. Without it, a query slide that is
        also in the index is predicted in-sample, and a warning says so.
    images
        Put each slide's downscaled H&E into ``uns['spatial']`` (:func:`spatial_libraries`).
    out
        ``.h5ad`` file to write (atomically).
    plot
        Also write maps of the most variable predicted genes next to ``out``
        (``<out>.<slide>.png``), over the slide's H&E when ``images``.
    smooth
        Smooth each slide's predictions over the tiles within the index's radius:
        ``(1 - alpha) * own + alpha * mean of neighbours``, with the strength ``alpha`` chosen
        when the index was built, by cross-validation on its reference (never on the query).

    Returns
    -------
    AnnData of the prediction contract (see the module docstring).
    """
    import pandas as pd

    from embedstore.index_folder import load_index
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
    smoothing = _smoothing(idx, index) if smooth else None
    if aggregator == idx.manifest["aggregator"]["name"]:
        aggregator = None  # the index's own, with the parameters it was built with
    slides = list(slide_ids) if slide_ids else _slides(st, encoder, cohort)
    if out is not None:  # refuse a bad output before computing anything
        check_prediction_out(out)
        for slide in slides if plot else ():
            check_replaceable(_map_path(Path(out), slide), MAP_KIND, what="prediction map (.png)", option="--out")
    patients = _patients(st)
    values, obs = [], []
    # One row group (~64 MiB of vectors) at a time: memory does not grow with the slide. Every
    # file's fingerprint and tile geometry are checked against the index's before the first chunk.
    chunks = st.iter_embeddings(
        encoder, cohort=cohort, slide_ids=slides, fingerprint=idx.fingerprint or None, geometry=idx.geometry
    )
    for meta, emb in chunks:
        if not len(emb):
            continue
        tiles = _tile_obs(meta, patients)
        groups = None
        if exclude_own is not None:
            groups = tiles[exclude_own].to_numpy(dtype=str)
            if exclude_own == Col.PATIENT and (groups == "").any():
                msg = "exclude_own='patient' (--exclude-own patient): some tiles have no patient in the store's spots table; use exclude_own='slide_id'"
                raise BadInput(msg)
        predicted = idx.predict(
            emb, k=k, aggregator=aggregator, query_groups=groups, group_by=exclude_own or Col.SLIDE_ID,
            fingerprint=meta.column(Col.FINGERPRINT)[0].as_py(),
        )  # fmt: skip
        values.append(predicted)
        obs.append(tiles)
        LOG.info("predicted %d tiles of %s", len(emb), tiles[Col.SLIDE_ID].iat[0])
    if not values:
        msg = f"{st.root}: the selected slides ({', '.join(slides[:5])}) hold no tiles of encoder {encoder!r}; embed them again"
        raise BadInput(msg)
    tiles = pd.concat(obs, ignore_index=True)
    slides_done = list(dict.fromkeys(zip(tiles[Col.COHORT], tiles[Col.SLIDE_ID], strict=True)))
    values = np.concatenate(values)
    if smoothing is not None:
        values = _smoothed(st, encoder, tiles, values, smoothing)
    if exclude_own is None:
        _warn_in_sample(idx, slides_done)
    uns = {
        "index": str(index) if isinstance(index, str | Path) else "",
        "encoder": idx.manifest["embedstore.encoder"],
        "k": k,
        "aggregator": aggregator or idx.manifest["aggregator"]["name"],
        "exclude_own": exclude_own or "",
        "n_exemplars": len(idx),
        **({"smoothing": smoothing} if smoothing else {}),
    }
    spatial = spatial_libraries(st, encoder, slides_done) if images else None
    adata = prediction_anndata(values, idx.genes, tiles, uns=uns, spatial=spatial)
    if out is not None:
        write_h5ad(adata, out)
        if plot:
            _plot(adata, Path(out))
    return adata


def _smoothing(idx: Any, index: Any) -> dict[str, Any]:
    """The index's smoothing (radius, strength chosen on its reference); one line when it has none."""
    chosen = idx.manifest.get("smoothing")
    if not chosen:
        msg = (
            f"smooth (--smooth): the index {index if isinstance(index, str | Path) else ''} has no smoothing chosen on "
            "its reference (built from one slide or patient, from spots without known µm/px, or by an older "
            "embedstore); rebuild it, or predict without --smooth"
        )
        raise BadInput(msg)
    return {k: chosen[k] for k in ("radius_um", "alpha")}


def _smoothed(st: Any, encoder: str, tiles: Any, values: np.ndarray, smoothing: dict[str, Any]) -> np.ndarray:
    """Each slide's predictions smoothed over its own tiles within the radius (positions in µm)."""
    from embedstore.context import slide_mpp
    from embedstore.smoothing import neighbour_graph, smooth

    out = values.copy()
    cohorts, slides = tiles[Col.COHORT].astype(str).to_numpy(), tiles[Col.SLIDE_ID].astype(str).to_numpy()
    for cohort, slide in dict.fromkeys(zip(cohorts, slides, strict=True)):
        rows = np.flatnonzero((cohorts == cohort) & (slides == slide))
        xy = tiles[[Col.X, Col.Y]].to_numpy(dtype=np.float64)[rows] * slide_mpp(st, encoder, cohort, slide)
        out[rows] = smooth(values[rows], neighbour_graph(xy, smoothing["radius_um"]), smoothing["alpha"])
    return out


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
        msg = f"aggregator='learned' (--aggregator): this index's aggregator is {own!r}; build an index whose recipe has aggregator name = \"learned\", or use mean, softmax, idw or loki"
        raise BadInput(msg)


def _slides(st: Any, encoder: str, cohort: str | None) -> list[str]:
    where = "WHERE encoder = ?" + (" AND cohort = ?" if cohort else "")
    params = [encoder, cohort] if cohort else [encoder]
    df = st.sql(f"SELECT DISTINCT slide_id FROM slides {where} ORDER BY slide_id", params=params)
    if df.empty:
        msg = f"{st.root}: no slides for encoder {encoder!r}{f' in cohort {cohort!r}' if cohort else ''}; embed them first"
        raise BadInput(msg)
    return df.slide_id.tolist()


def _patients(st: Any) -> dict[tuple[str, str, str], str]:
    """Patient of every spot in the store's spots table, by (cohort, slide_id, spot_id)."""
    spots = st.sql("SELECT cohort, slide_id, spot_id, patient FROM spots WHERE patient IS NOT NULL", output="pandas")
    return {(c, s, p): pt for c, s, p, pt in spots.itertuples(index=False)}


def _tile_obs(meta: Any, patients: dict[tuple[str, str, str], str]) -> Any:
    """The :data:`OBS_COLUMNS` of a chunk of stored tiles (patient "" where the store has none)."""
    df = meta.select([c for c in OBS_COLUMNS if c in meta.column_names]).to_pandas()
    df[Col.SPOT_ID] = df[Col.SPOT_ID].fillna("").astype(str)
    keys = zip(df[Col.COHORT], df[Col.SLIDE_ID], df[Col.SPOT_ID], strict=True)
    df[Col.PATIENT] = [patients.get(key, "") for key in keys]
    return df[list(OBS_COLUMNS)]


def _warn_in_sample(idx: Any, predicted: Sequence[tuple[str, str]]) -> None:
    """One warning when predicted slides are also exemplars of the index (their own spots are neighbours)."""
    exemplar_slides = set(idx.exemplars.column(Col.SLIDE_ID).to_pylist())
    built_from = (idx.manifest.get("recipe") or {}).get(Col.COHORT)
    cohorts = None if not built_from else {built_from} if isinstance(built_from, str) else set(built_from)
    shared = [s for c, s in predicted if s in exemplar_slides and (cohorts is None or c in cohorts)]
    if shared:
        LOG.warning(
            "slide(s) %s are in the index: each tile's own measured spot is among its neighbours (in-sample); "
            "pass exclude_own='slide_id' or 'patient' (--exclude-own slide|patient) to leave them out",
            ", ".join(shared[:10]) + (", ..." if len(shared) > 10 else ""),
        )


def _plot(adata: Any, out: Path) -> None:
    from PIL import Image

    from embedstore.report import plot_prediction_maps

    variable = np.argsort(-np.asarray(adata.X).var(axis=0))[:4]
    genes = [adata.var_names[i] for i in variable]
    for slide in adata.obs[Col.SLIDE_ID].unique():
        sub = adata[adata.obs[Col.SLIDE_ID] == slide]
        library = adata.uns[UNS_SPATIAL].get(slide)
        thumb, scale = None, 1.0
        if library is not None:
            thumb = Image.fromarray(library["images"]["hires"])
            scale = library["scalefactors"]["tissue_hires_scalef"]
        plot_prediction_maps(sub, thumb, scale, genes, _map_path(out, slide))


def _map_path(out: Path, slide: str) -> Path:
    """``<out>.<slide>.png`` beside the prediction file."""
    return out.with_suffix(f".{slide}.png")
