"""IVF indexes larger than memory: trained on a sample, filled shard by shard, inverted lists on disk.

When the vectors of an index do not fit in its memory budget (:func:`choose_layout`), the coarse
quantiser and the codec (SQ8, SQfp16 or PQ) are trained on a sample of them, shards are filled
from streamed batches into copies of the trained empty index (:func:`fill_shard`: files in, a
file out, so that a cluster can run each shard as its own task; :func:`one_by_one` runs them
here), and FAISS merges the shards'
lists into one ``OnDiskInvertedLists`` file, ``index.ivfdata`` beside ``index.faiss``
(:func:`build_ondisk`, through ``faiss.contrib.ondisk.merge_ondisk``). Searches map that file
read-only (:func:`embedstore.store._tile_search.read_ondisk_index`), wherever its folder has
moved. The search settings are tuned as :func:`embedstore._knn.build_tuned` tunes them, on
held-out indexed vectors whose exact neighbours are found shard by shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._knn import BATCH_ENTRIES, TUNE_QUERIES, _new_index, _trained, import_faiss, ivf_nlist, tune_held_out
from embedstore._progress import stage, step
from embedstore._vectors import ivf_of
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

IVFDATA_FILE = "index.ivfdata"
LAYOUTS = ("auto", "memory", "ondisk")
SHARDS_DIR = ".shards"  # inside the folder being built; removed before it is published
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


# ------------------------------------------------------------------------------ deciding the layout


def available_memory() -> int:
    """Bytes of memory available to new work now (``MemAvailable``; total memory where that is unknown)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with Path("/proc/meminfo").open() as f:
            line = next(ln for ln in f if ln.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """Half the available memory: the rest stays for the page cache and other work."""
    return available_memory() // 2


def parse_memory_budget(value: int | str | None, where: str = "memory_budget") -> int:
    """Bytes of a budget given as bytes or text (``"512MB"``, ``"8GiB"``); None: :func:`default_memory_budget`."""
    if value is None:
        return default_memory_budget()
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if m and m[2].lower() in _UNITS and float(m[1]) > 0:
        return int(float(m[1]) * _UNITS[m[2].lower()])
    msg = f"{where}={value!r}: not a memory size; give bytes or text such as '512MB' or '8GiB'"
    raise BadInput(msg)


def in_memory_bytes(n: int, dim: int) -> int:
    """Estimated peak of an in-memory build: the float32 vectors twice (as read, and normalised) plus their codes."""
    return 2 * n * dim * 4 + n * (dim + 8)


def choose_layout(n: int, dim: int, layout: str = "auto", memory_budget: int | str | None = None) -> str:
    """``"memory"`` or ``"ondisk"``: ``layout`` itself, or for ``"auto"`` on-disk lists when
    :func:`in_memory_bytes` exceeds ``memory_budget``."""
    if layout not in LAYOUTS:
        msg = f"layout={layout!r}: unknown; use 'auto', 'memory' or 'ondisk'"
        raise BadInput(msg)
    budget = parse_memory_budget(memory_budget)
    if layout != "auto":
        return layout
    need = in_memory_bytes(n, dim)
    if need <= budget:
        return "memory"
    step("%d x %d vectors need about %.2f GB in memory, more than the budget of %.2f GB: inverted lists on disk",
         n, dim, need / 1e9, budget / 1e9)  # fmt: skip
    return "ondisk"


def ondisk_factory(factory: str | None, n: int, dim: int) -> str:
    """The factory of an on-disk build: ``IVF{nlist},SQ8`` for None/``"auto"``, else ``factory`` if it is an IVF index."""
    if factory in (None, "auto"):
        return f"IVF{ivf_nlist(n)},SQ8"
    faiss = import_faiss("on-disk index")
    if ivf_of(faiss, _new_index(faiss, dim, str(factory), "ip")) is None:
        msg = (
            f"factory {factory!r}: keeps every vector in memory; use an IVF factory (e.g. 'IVF4096,SQ8' or "
            "'IVF4096,PQ32') for on-disk lists, or a memory layout"
        )
        raise BadInput(msg)
    return str(factory)


def ivf_shape(factory: str, dim: int) -> tuple[int, int]:
    """``(nlist, code_size)`` of an IVF factory string at ``dim``.

    Read while the index is alive: the IVF layer FAISS hands out is a view into its index, and
    reading it after the index is freed gives whatever the memory holds by then.
    """
    faiss = import_faiss("on-disk index")
    index = _new_index(faiss, dim, factory, "ip")
    ivf = ivf_of(faiss, index)
    return int(ivf.nlist), int(ivf.code_size)


def sample_size(n: int, dim: int, nlist: int, memory_budget: int) -> int:
    """Training vectors of an on-disk build: 64 per list (as in memory) within a quarter of the budget, at least 10,000.

    The floor keeps the codec's ranges (SQ) and codebooks (PQ) trained on enough vectors; it
    costs 10 MB at 256-d.
    """
    cap = memory_budget // 4 // (4 * dim)
    return int(min(n, max(min(64 * nlist, cap), 10_000)))


def shard_rows(memory_budget: int, code_size: int) -> int:
    """Vectors per shard: their codes and ids take at most a quarter of the budget (lists may double when they grow)."""
    return max(1, memory_budget // 8 // (code_size + 8))


def ondisk_lists(faiss: Any, index: Any) -> Any:
    """The ``OnDiskInvertedLists`` of ``index``, or None when its lists (if any) are in memory."""
    ivf = ivf_of(faiss, index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


# ------------------------------------------------------------------------------ shards


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Indexed vectors used as queries to tune the search, with their ids (their own never counts as a neighbour)."""

    queries: np.ndarray  # (m, d) float32
    ids: np.ndarray  # (m,) int64
    k: int


def exact_top_k(held: HeldOut, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and ids (m, k) of the ``k`` vectors of ``batches`` most similar to each held-out query.

    FAISS's exact search (``faiss.knn``: BLAS in blocks, a heap per query) of each batch for k + 1,
    merged into a running top-k; each query's own id is left out. Its memory is the (m, k + 1)
    answers, not the (m, batch) similarities.
    """
    faiss = import_faiss("on-disk index")
    m, k = len(held.queries), held.k
    best_s = np.full((m, k), -np.inf, dtype=np.float32)
    best_i = np.full((m, k), -1, dtype=np.int64)
    queries = np.ascontiguousarray(held.queries, dtype=np.float32)
    for ids, x in batches:
        if len(x) == 0:
            continue
        sims, rows = faiss.knn(queries, np.ascontiguousarray(x, dtype=np.float32), min(k + 1, len(x)),
                               metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        found = np.asarray(ids, dtype=np.int64)[rows]
        sims[found == held.ids[:, None]] = -np.inf
        cand_s = np.concatenate([best_s, sims], axis=1)
        cand_i = np.concatenate([best_i, found], axis=1)
        keep = np.argpartition(cand_s, cand_s.shape[1] - k, axis=1)[:, -k:]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_s, best_i


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Ids (m, k) of the best ``k`` of several shards' :func:`exact_top_k`."""
    sims = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    keep = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(ids, keep, 1)


def fill_shard(
    trained_file: str | Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    out_file: str | Path,
    held: HeldOut | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Add ``(ids, vectors)`` batches to a copy of the trained empty index and write it to ``out_file``.

    Parameters
    ----------
    trained_file
        The trained empty IVF index (``faiss.write_index``), shared by every shard.
    batches
        (ids int64 (b,), L2-normalised float32 (b, d)); a shard's ids are disjoint from other shards'.
    out_file
        Where the filled shard is written.
    held
        Held-out queries: their exact top-k among this shard's vectors is returned.

    Returns
    -------
    :func:`exact_top_k` of ``held`` over the shard, or None without ``held``.
    """
    faiss = import_faiss("on-disk index")
    index = faiss.read_index(str(trained_file))

    def added() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, x in batches:
            index.add_with_ids(x, ids)
            yield ids, x

    if held is None:
        for _ in added():
            pass
        top = None
    else:
        top = exact_top_k(held, added())
    faiss.write_index(index, str(out_file))
    return top


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """FAISS's on-disk lists print progress ("resizing ...") with printf: keep it off stdout, which carries results."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers its lines: flush them while fd 1 still is stderr
        os.dup2(saved, 1)
        os.close(saved)


def _merge(trained_file: Path, shard_files: list[Path], ivfdata: Path) -> Any:
    """The trained index with the shards' lists merged into ``ivfdata`` by FAISS (shards memory-mapped)."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = import_faiss("on-disk index")
    index = faiss.read_index(str(trained_file))
    with stdout_to_stderr():
        merge_ondisk(index, [str(f) for f in shard_files], str(ivfdata))
    return index


# ------------------------------------------------------------------------------ the build

ShardTop = tuple[np.ndarray, np.ndarray] | None  # a shard's exact top-k of the held-out queries
FillShard = Callable[[int, Path, Path, HeldOut | None], ShardTop]
FillShards = Callable[[Path, list[Path], HeldOut | None], list[ShardTop]]


def one_by_one(fill: FillShard) -> FillShards:
    """Shards filled one after the other in this process: ``fill(i, trained_file, out_file, held)`` for each."""

    def fill_shards(trained_file: Path, out_files: list[Path], held: HeldOut | None) -> list[ShardTop]:
        tops = []
        for i, out in enumerate(out_files):
            with stage("shard %d/%d", i + 1, len(out_files)):
                tops.append(fill(i, trained_file, out, held))
        return tops

    return fill_shards


def build_ondisk(
    sample: np.ndarray,
    sample_ids: np.ndarray,
    n_shards: int,
    fill_shards: FillShards,
    folder: Path,
    factory: str | None = None,
    *,
    n_total: int,
    k: int = 10,
    target_recall: float = 0.95,
    nprobe: int | None = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Train on ``sample``, fill ``n_shards`` shards, merge their lists into ``folder/index.ivfdata``, tune.

    Parameters
    ----------
    sample, sample_ids
        L2-normalised training vectors drawn at random from all ``n_total``, and their ids;
        the held-out queries that tune the search are some of them.
    n_shards, fill_shards
        ``fill_shards(trained_file, out_files, held)`` writes shard ``i`` to ``out_files[i]``
        with :func:`fill_shard` and returns each shard's exact top-k of ``held``, in order.
        The shards are independent: :func:`one_by_one` fills them here, a cluster may run
        each as a task.
    folder
        Receives ``index.ivfdata``; shards go to its subfolder ``.shards``, removed at the end
        unless ``fill_shards`` left other files there.
    factory
        An IVF factory string; None or ``"auto"``: ``IVF{nlist},SQ8``, its lists rebuilt as
        SQfp16 on the same quantiser when SQ8 cannot reach ``target_recall`` (as in
        :func:`embedstore._knn.build_tuned`).
    n_total
        Vectors in all shards.
    k, target_recall, nprobe, seed
        As in :func:`embedstore._knn.build_tuned`.

    Returns
    -------
    The index (its lists mapped from ``folder/index.ivfdata``) and its search settings, with
    ``layout``: ``{"invlists": "ondisk", "n_shards", "n_train"}``.
    """
    faiss = import_faiss("on-disk index")
    auto = factory in (None, "auto")
    factory = ondisk_factory(factory, n_total, sample.shape[1])
    work = folder / SHARDS_DIR
    work.mkdir(parents=True, exist_ok=True)
    trained_file = work / "trained.faiss"
    with stage("training %s on %d sampled vectors", factory, len(sample)):
        faiss.write_index(_trained(faiss, sample, factory, "ip", "cpu", seed), str(trained_file))
    rows = np.random.default_rng(seed).choice(len(sample), min(TUNE_QUERIES, len(sample)), replace=False)
    k = max(1, min(k, n_total - 1))
    held = HeldOut(sample[rows], np.asarray(sample_ids)[rows].astype(np.int64), k)
    index, truth = _fill_and_merge(trained_file, n_shards, fill_shards, folder, held)
    nlist = ivf_of(faiss, index).nlist
    settings = tune_held_out(
        index, held.queries, held.ids, truth, k, target_recall, nprobe, nlist // 4 if auto else None
    )
    extra: dict[str, Any] = {}
    if auto:
        why = f"SQ8 reached recall@{k} {settings['recall_tune']:.3f} at nprobe {settings['nprobe']}"
        if not settings["reached"]:
            why = (f"SQ8 reached recall@{k} {settings['recall_tune']:.3f} at most (nprobe up to {nlist // 4} = "
                   f"nlist/4), below the target {target_recall:.3g}: its 8-bit codes limit the recall")  # fmt: skip
            step("%s; SQfp16 lists on the same coarse quantiser", why)
            del index  # unmaps the SQ8 lists before their file is replaced
            _as_fp16(faiss, trained_file)
            (folder / IVFDATA_FILE).unlink()
            index, _ = _fill_and_merge(trained_file, n_shards, fill_shards, folder, None)
            factory = f"IVF{nlist},SQfp16"
            settings = tune_held_out(index, held.queries, held.ids, truth, k, target_recall, nprobe, None)
        extra = {"codec": factory.split(",")[-1], "codec_reason": why}
    elif not settings["reached"]:
        LOG.warning("%s: recall@%d %.3f at best, below the target %.3g; use a finer codec or more lists",
                    factory, k, settings["recall_tune"], target_recall)  # fmt: skip
    trained_file.unlink()
    with contextlib.suppress(OSError):  # left when a shard wrote other files there, for the caller
        work.rmdir()
    layout = {"invlists": "ondisk", "n_shards": n_shards, "n_train": len(sample)}
    return index, {"factory": factory, **settings, **extra, "layout": layout}


def _fill_and_merge(
    trained_file: Path, n_shards: int, fill_shards: FillShards, folder: Path, held: HeldOut | None
) -> tuple[Any, np.ndarray | None]:
    """Every shard filled, then merged in shard order into ``folder/index.ivfdata``; the exact top-k ids of ``held``."""
    files = [trained_file.parent / f"shard-{i:05d}.faiss" for i in range(n_shards)]
    tops = [top for top in fill_shards(trained_file, files, held) if top is not None]
    with stage("merging %d shards into %s", n_shards, IVFDATA_FILE):
        index = _merge(trained_file, files, folder / IVFDATA_FILE)
    for f in files:
        f.unlink()
    return index, (merge_top_k(tops, held.k) if held is not None else None)


def _as_fp16(faiss: Any, trained_file: Path) -> None:
    """Rewrite the trained SQ8 index at ``trained_file`` as IVF-SQfp16 on the same coarse quantiser."""
    trained = faiss.read_index(str(trained_file))
    ivf = faiss.extract_index_ivf(trained)  # a view into ``trained``, which must outlive it
    quantizer = faiss.clone_index(ivf.quantizer)
    fp16 = faiss.IndexIVFScalarQuantizer(
        quantizer, ivf.d, ivf.nlist, faiss.ScalarQuantizer.QT_fp16, ivf.metric_type, ivf.by_residual
    )
    fp16.own_fields = True
    quantizer.this.disown()  # the index owns and frees its quantiser
    fp16.is_trained = True  # fp16 codes need no training, and the quantiser is trained
    faiss.write_index(fp16, str(trained_file))


# ------------------------------------------------------------------------------ arrays in memory


def build_ondisk_from_array(
    vectors: np.ndarray,
    folder: Path,
    factory: str | None = None,
    *,
    memory_budget: int | str | None = None,
    k: int = 10,
    target_recall: float = 0.95,
    nprobe: int | None = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """:func:`build_ondisk` over the rows of ``vectors`` (ids = row numbers), shards of consecutive rows.

    For vectors already in memory (an exemplar index's keys): the index's codes go to disk, and
    searches map them instead of holding them.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    budget = parse_memory_budget(memory_budget)
    nlist, code_size = ivf_shape(ondisk_factory(factory, n, dim), dim)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, sample_size(n, dim, nlist, budget), replace=False))
    per_shard = shard_rows(budget, code_size)
    n_shards = math.ceil(n / per_shard)

    def fill(i: int, trained: Path, out: Path, held: HeldOut | None) -> Any:
        s = i * per_shard
        stop = min(n, s + per_shard)
        step_rows = max(1, BATCH_ENTRIES // dim)
        batches = (
            (np.arange(a, min(a + step_rows, stop), dtype=np.int64), x[a : min(a + step_rows, stop)])
            for a in range(s, stop, step_rows)
        )
        return fill_shard(trained, batches, out, held)

    return build_ondisk(x[rows], rows, n_shards, one_by_one(fill), folder, factory, n_total=n, k=k,
                        target_recall=target_recall, nprobe=nprobe, seed=seed)  # fmt: skip
