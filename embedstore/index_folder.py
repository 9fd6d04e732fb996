"""The exemplar index folder: an :class:`~embedstore.index.ExemplarIndex` on disk.

Layout::

    index.faiss        faiss.write_index (always a CPU index)
    index.ivfdata      its inverted lists, when they were built on disk (manifest search.layout)
    exemplars.parquet  slide_id, spot_id, patient, key (vector), expression (panel vector)
    panel.json         the gene panel (expression.Panel)
    aligner/           config.json + model.safetensors (absent for the raw-embedding baseline)
    aggregator/        config.json + model.safetensors (only for the learned aggregator)
    manifest.json      schema version, encoder (name, fingerprint), factory, search settings
                       chosen at build time (nprobe, recall reached), metric, keys, n, dim, ...

The folder is written beside its destination and swapped in whole. It is data: the loader
follows no path that leads outside it, and refuses parts that were not built together.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._atomic import atomic_folder, check_replaceable
from embedstore._knn import gpu_available, import_faiss, set_search_params
from embedstore._ondisk import IVFDATA_FILE, ondisk_lists
from embedstore._optional import import_optional
from embedstore._params import Int, validate_manifest, validated
from embedstore._schema import META_ENCODER, META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION, Col, parse_geometry
from embedstore.aggregate import AGGREGATORS, LearnedAggregator, create_aggregator, load_learned_aggregator
from embedstore.aligner import load_aligner
from embedstore.errors import BadInput
from embedstore.expression import Panel
from embedstore.index import AGGREGATOR_DIR, KIND, ExemplarIndex
from embedstore.store._tile_search import read_ondisk_index
from embedstore.text_aligner import load_text_aligner

LOG = logging.getLogger(__name__)

INDEX_FILE, EXEMPLARS_FILE, PANEL_FILE, MANIFEST_FILE = (
    "index.faiss",
    "exemplars.parquet",
    "panel.json",
    "manifest.json",
)
ALIGNER_DIR = "aligner"

__all__ = ["load_index", "save_index"]


def _fixed_list(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, dtype=np.float32).ravel()), a.shape[1])


def _matrix(col: pa.ChunkedArray, width: int) -> np.ndarray:
    return (
        col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=False)
    )


def save_index(idx: ExemplarIndex, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``idx`` as a directory, built beside ``path`` and swapped in whole.

    Parameters
    ----------
    idx
        The index.
    path
        Folder to write. An existing exemplar index is replaced (with ``overwrite``) in one
        atomic swap, so ``path`` holds a loadable index at every instant; anything else there
        (user files, a store, a store's subfolder) is refused and left untouched.
    overwrite
        Replace an existing exemplar index.

    Raises
    ------
    BadInput
        ``path`` is not replaceable (see :func:`embedstore._atomic.check_replaceable`).
    DiskFull
        The disk ran out; the temporary folder is removed and an old index stays in place.
    """
    faiss = import_faiss("save_index")
    pq = import_optional("pyarrow.parquet", "save_index")
    path = Path(path)
    check_replaceable(path, KIND, what="exemplar index", overwrite=overwrite, folder=True)
    size = int(idx.key_vectors.nbytes * 2 + idx.expression.nbytes + idx.exemplars.nbytes)
    with atomic_folder(path, size_hint=size) as tmp:
        cpu = faiss.index_gpu_to_cpu(idx.index) if gpu_available() and "Gpu" in type(idx.index).__name__ else idx.index
        faiss.write_index(cpu, str(tmp / INDEX_FILE))
        manifest = _with_layout(idx.manifest, ondisk_lists(faiss, cpu), tmp)
        table = idx.exemplars.append_column(Col.KEY, _fixed_list(idx.key_vectors)).append_column(
            Col.EXPRESSION, _fixed_list(idx.expression)
        )
        meta = {
            META_SCHEMA_VERSION: SCHEMA_VERSION,
            META_KIND: "exemplars",
            META_ENCODER: json.dumps(idx.manifest[META_ENCODER]),
        }
        pq.write_table(table.replace_schema_metadata(meta), tmp / EXEMPLARS_FILE)
        (tmp / PANEL_FILE).write_text(idx.panel.to_json())
        if idx.aligner is not None:  # the BLEEP aligner, or for text keys the text aligner
            idx.aligner.save(tmp / ALIGNER_DIR)
        if isinstance(idx.aggregator, LearnedAggregator):
            idx.aggregator.save(tmp / AGGREGATOR_DIR)
        # The manifest marks the folder as an index: written last, so a folder without it is incomplete.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return path


def _with_layout(manifest: dict[str, Any], lists: Any, tmp: Path) -> dict[str, Any]:
    """The manifest with ``search.layout`` saying where the index's lists are, after copying on-disk lists into ``tmp``."""
    search = manifest.get("search")
    if lists is None and not (isinstance(search, dict) and "layout" in search):
        return manifest
    layout = {**search.get("layout", {}), "invlists": "ondisk" if lists is not None else "memory"}
    if lists is not None:
        src, dest = Path(lists.filename), tmp / IVFDATA_FILE
        try:
            os.link(src, dest)  # the lists are never written after the build: share them when the disk allows
        except OSError:
            shutil.copyfile(src, dest)
        layout["files"] = {name: (tmp / name).stat().st_size for name in (INDEX_FILE, IVFDATA_FILE)}
    return {**manifest, "search": {**search, "layout": layout}}


def _inside(folder: Path, rel: Any, where: str) -> Path:
    """``folder / rel``, refused unless it stays inside ``folder`` with every link followed.

    ``where`` names the file (or the manifest file and key) the path comes from.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        msg = (
            f"{where} is {rel!r}: a path in an index folder must be relative and stay inside it "
            "(no absolute path, no '..'); rebuild the index"
        )
        raise BadInput(msg)
    try:
        target = (folder / rel).resolve()
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
        msg = f"{where}: {rel!r} cannot be followed ({e}); an index folder must hold its own files: rebuild the index"
        raise BadInput(msg) from e
    if not target.is_relative_to(folder.resolve()):
        msg = (
            f"{where}: {rel!r} leads to {target}, outside the index folder {folder} (through a link); "
            "an index folder must hold its own files: copy them in or rebuild the index"
        )
        raise BadInput(msg)
    return folder / rel


@validated
def load_index(
    path: str | Path, device: str = "cpu", nprobe: int | None = None, efSearch: int | None = None
) -> ExemplarIndex:
    """Read an index directory written by :func:`save_index`.

    Parameters
    ----------
    path
        The directory.
    device
        ``"cpu"``, or ``"auto"``/``"cuda"`` to move the faiss index to the GPU when there is one.
    nprobe, efSearch
        Override the stored search settings (the manifest's ``search``, chosen at build time;
        an index written before those were recorded keeps the nprobe of its index file).

    Raises
    ------
    BadInput
        Naming the file when a file is missing or corrupted, or the schema version differs;
        naming the file and key when a path leads outside the folder (absolute, ``..``, a link).
    """
    faiss = import_faiss("load_index")
    pq = import_optional("pyarrow.parquet", "load_index")
    path = Path(path)
    for f in (MANIFEST_FILE, INDEX_FILE, EXEMPLARS_FILE, PANEL_FILE):
        _inside(path, f, str(path / f))
        if not (path / f).is_file():
            msg = f"{path / f}: missing; {path} is not a complete exemplar index; pass an index folder (embedstore index build writes one)"
            raise BadInput(msg)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path / MANIFEST_FILE}: not valid JSON ({e}); rebuild the index"
        raise BadInput(msg) from e
    manifest = validate_manifest(manifest, path / MANIFEST_FILE, kind=KIND, aggregators=AGGREGATORS)
    search = _search_settings(manifest, path / MANIFEST_FILE)
    # An index folder is data: nothing in it may send the loader elsewhere on the disk.
    spec = manifest["aggregator"]
    agg_dir = None
    if spec["name"] == "learned":
        key = f"{path / MANIFEST_FILE}: key 'aggregator.params.path'"
        agg_dir = _inside(path, spec["params"].get("path"), key)
    aligner_dir = _inside(path, ALIGNER_DIR, str(path / ALIGNER_DIR)) if manifest["aligned"] else None
    parse_geometry(manifest[META_ENCODER].get("geometry"), f"{path / MANIFEST_FILE}: key '{META_ENCODER}.geometry'")
    try:
        index = _read_faiss(faiss, path, search)
    except RuntimeError as e:
        msg = f"{path / INDEX_FILE}: faiss cannot read it ({str(e).strip().splitlines()[-1]}); the file is corrupted, rebuild the index"
        raise BadInput(msg) from e
    try:
        table = pq.read_table(path / EXEMPLARS_FILE)
    except (pa.ArrowException, OSError) as e:
        msg = f"{path / EXEMPLARS_FILE}: cannot be read as Parquet ({e}); the file is corrupted, rebuild the index"
        raise BadInput(msg) from e
    panel = Panel.from_json((path / PANEL_FILE).read_text(), str(path / PANEL_FILE))
    n, dim = int(manifest["n"]), int(manifest["dim"])
    if index.ntotal != n or index.d != dim or table.num_rows != n:
        msg = f"{path}: index.faiss ({index.ntotal} x {index.d}), exemplars.parquet ({table.num_rows} rows) and manifest ({n} x {dim}) disagree; rebuild the index"
        raise BadInput(msg)
    key_vectors = _matrix(table.column(Col.KEY), dim)
    expression = _matrix(table.column(Col.EXPRESSION), len(panel))
    exemplars = table.select([Col.SLIDE_ID, Col.SPOT_ID, Col.PATIENT]).replace_schema_metadata(None)
    aligner = None
    if aligner_dir is not None:
        aligner = load_text_aligner(aligner_dir) if manifest["keys"] == "text" else load_aligner(aligner_dir)
    agg = load_learned_aggregator(agg_dir) if agg_dir is not None else create_aggregator(spec["name"], **spec["params"])
    _check_parts_agree(path, manifest, panel, aligner, agg)
    if device != "cpu" and gpu_available():
        res = faiss.StandardGpuResources()
        try:
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            gpu.referenced_objects = [res]
            index = gpu
        except RuntimeError as e:
            LOG.info("load_index: keeping %s on the CPU (%s)", manifest["factory"], e)
    set_search_params(index, nprobe=nprobe or (search or {}).get("nprobe"), efSearch=efSearch)
    return ExemplarIndex(index, exemplars, expression, key_vectors, panel, aligner, agg, manifest)


def _read_faiss(faiss: Any, path: Path, search: dict[str, Any] | None) -> Any:
    """``index.faiss``, its lists mapped read-only from ``index.ivfdata`` when the manifest says they are on disk."""
    layout = (search or {}).get("layout", {})
    if not isinstance(layout, dict) or layout.get("invlists") != "ondisk":
        return faiss.read_index(str(path / INDEX_FILE))
    data = _inside(path, IVFDATA_FILE, str(path / IVFDATA_FILE))
    for name, size in layout.get("files", {}).items():
        where = _inside(path, name, f"{path / MANIFEST_FILE}: key 'search.layout.files'")
        if not where.is_file() or where.stat().st_size != size:
            msg = f"{where}: missing or not the {size} bytes its manifest records; the folder is incomplete, rebuild the index"
            raise BadInput(msg)
    return read_ondisk_index(path / INDEX_FILE, data)


def _search_settings(manifest: Any, file: Path) -> dict[str, Any] | None:
    """The manifest's ``search`` table (None when absent: an index from before build-time tuning)."""
    if not isinstance(manifest, dict) or "search" not in manifest:
        return None
    search = manifest["search"]
    nprobe = search.get("nprobe") if isinstance(search, dict) else None
    if not isinstance(search, dict) or Int(min=1, optional=True).problem(nprobe) is not None:
        msg = f"{file}: key 'search' is {search!r}, must be a table whose nprobe is None or an integer >= 1; rebuild the index"
        raise BadInput(msg)
    return search


def _check_parts_agree(path: Path, manifest: dict[str, Any], panel: Panel, aligner: Any, agg: Any) -> None:
    """Raise BadInput naming both files when the folder's parts were not made together."""
    sizes = [(MANIFEST_FILE, "n_genes", int(manifest["n_genes"]), PANEL_FILE, len(panel))]
    if aligner is not None and manifest["keys"] == "text":
        cfg, where = aligner.config, f"{ALIGNER_DIR}/config.json"
        sizes += [
            (where, "image_dim", cfg.image_dim, MANIFEST_FILE + " input_dim", int(manifest["input_dim"])),
            (where, "dim", aligner.dim, MANIFEST_FILE + " dim", int(manifest["dim"])),
        ]
    elif aligner is not None:
        cfg, where = aligner.config, f"{ALIGNER_DIR}/config.json"
        if cfg.genes and tuple(cfg.genes) != tuple(panel.genes):
            msg = f"{path / where}: trained on genes {list(cfg.genes)[:3]}..., which are not the panel of {path / PANEL_FILE}; rebuild the index"
            raise BadInput(msg)
        sizes += [
            (where, "image_dim", cfg.image_dim, MANIFEST_FILE + " input_dim", int(manifest["input_dim"])),
            (where, "n_genes", cfg.n_genes, PANEL_FILE, len(panel)),
        ]
    if isinstance(agg, LearnedAggregator):
        where = f"{AGGREGATOR_DIR}/config.json"
        sizes += [
            (where, "n_genes", agg.config.n_genes, PANEL_FILE, len(panel)),
            (where, "key_dim", agg.config.key_dim, MANIFEST_FILE + " dim", int(manifest["dim"])),
        ]
    for file, key, value, other, want in sizes:
        if value != want:
            msg = f"{path / file}: {key} = {value}, but {other} says {want}; the folder's parts come from different builds, rebuild the index"
            raise BadInput(msg)
