"""Prediction at cohort scale: one ``.h5ad`` per slide in a folder, here or sharded over a Ray cluster.

One AnnData for a whole cohort holds every tile's prediction in memory (100M tiles × 250
genes × 4 B = 100 GB), so a cohort is written as one prediction file per slide, each the
contract of :func:`embedstore.prediction.predict` (scanpy/squidpy read it as it is), in
``OUT/<cohort>/<slide_id>.h5ad``. ``OUT/predictions.json`` records the index and settings;
a rerun with the same settings skips the slides already written (each file is published
atomically, so one that exists is complete) and predicts the rest.

On Ray (``engine="ray"``), Ray Data hands slides to prediction actors, one per node, each
loading the index once (inverted lists on disk are memory-mapped, not read); an actor that
dies is restarted and its slide predicted again. Every node must see the index, the store
and ``OUT`` at the same path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedstore import _ray
from embedstore._atomic import KIND_KEY, atomic_file, check_replaceable
from embedstore._progress import step
from embedstore.errors import BadInput, EmbedstoreError
from embedstore.slide_jobs import SlideReport, SlideResult

LOG = logging.getLogger(__name__)

MARKER = "predictions.json"
KIND = "predictions"


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """What every slide of one cohort prediction is predicted with."""

    index: str
    store: str
    out: str
    k: int | None
    aggregator: str | None
    exclude_own: str | None
    images: bool

    def record(self) -> dict[str, Any]:
        """What ``predictions.json`` holds: the settings a rerun must share to resume."""
        return {KIND_KEY: KIND, **dataclasses.asdict(self)}


@dataclasses.dataclass
class CohortPrediction(SlideReport):
    """Per-slide outcome of :func:`predict_cohort` (``ok``, ``summary()``), and where the files are."""

    out: Path
    results: list[SlideResult]


def slide_file(out: Path, cohort: str, slide_id: str) -> Path:
    """Where the prediction of one slide goes."""
    return Path(out) / cohort / f"{slide_id}.h5ad"


def predict_cohort(
    index: str | Path,
    store: str | Path,
    out: str | Path,
    slide_ids: Sequence[str] | None = None,
    cohort: str | None = None,
    *,
    k: int | None = None,
    aggregator: str | None = None,
    exclude_own: str | None = None,
    images: bool = True,
    engine: str = "local",
    address: str | None = None,
) -> CohortPrediction:
    """Predict every selected slide into ``OUT/<cohort>/<slide_id>.h5ad`` (resumable).

    Parameters
    ----------
    index, store, slide_ids, cohort, k, aggregator, exclude_own, images
        As :func:`embedstore.predict`.
    out
        Folder of the predictions: new, empty, or one an earlier call with the same settings wrote.
    engine
        ``"local"``: slide after slide here; ``"ray"``: slides sharded over a Ray cluster.
    address
        Ray head node ``host:port`` (``engine="ray"``); default ``RAY_ADDRESS``, else Ray on this machine.
    """
    from embedstore.index_folder import load_index
    from embedstore.store import open_store

    if engine not in ("local", "ray"):
        msg = f"engine {engine!r}: not an engine; use local or ray"
        raise BadInput(msg)
    if engine == "ray":
        _ray.preflight(address, "predict --engine ray")
    out = Path(out)
    settings = PredictSettings(
        str(Path(index).resolve()), str(Path(store).resolve()), str(out.resolve()), k, aggregator, exclude_own, images
    )
    st = open_store(store)
    slides = _selection(st, load_index(index), slide_ids, cohort)
    _claim(out, settings)
    results: dict[tuple[str, str], SlideResult] = {}
    todo = []
    for key in slides:
        if slide_file(out, *key).is_file():
            results[key] = SlideResult(key[1], "skipped", 0, 0.0, "already predicted")
        else:
            todo.append(key)
    if engine == "ray":
        with _ray.session(address, "predict --engine ray") as ray:
            done = _predict_on_ray(ray, todo, settings)
    else:
        done = _predict_here(todo, settings)
    results.update(done)
    return CohortPrediction(out, [results[key] for key in slides])


def _selection(st: Any, idx: Any, slide_ids: Sequence[str] | None, cohort: str | None) -> list[tuple[str, str]]:
    """(cohort, slide) pairs to predict: the store's slides of the index's encoder, narrowed by the arguments."""
    encoder = idx.manifest["embedstore.encoder"].get("name")
    where, params = "WHERE encoder = ?", [encoder]
    if cohort:
        where, params = where + " AND cohort = ?", [*params, cohort]
    rows = st.sql(f"SELECT DISTINCT cohort, slide_id FROM slides {where} ORDER BY 1, 2", params=params)
    pairs = list(zip(rows.cohort, rows.slide_id, strict=True))
    if slide_ids:
        missing = sorted(set(slide_ids) - {s for _, s in pairs})
        if missing:
            msg = f"{st.root}: no slides {', '.join(missing[:5])} of encoder {encoder!r} here; check the ids"
            raise BadInput(msg)
        pairs = [p for p in pairs if p[1] in set(slide_ids)]
    if not pairs:
        msg = f"{st.root}: no slides for encoder {encoder!r}{f' in cohort {cohort!r}' if cohort else ''}; embed them first"
        raise BadInput(msg)
    return pairs


def _claim(out: Path, settings: PredictSettings) -> None:
    """Make ``out`` a predictions folder of these settings; refuse a folder embedstore did not write, or a store."""
    if check_replaceable(out, KIND, what="predictions folder", folder=True):
        recorded = json.loads((out / MARKER).read_text())
        if recorded != settings.record():
            changed = sorted(k for k, v in settings.record().items() if recorded.get(k) != v)
            msg = (
                f"{out}: holds predictions made with other settings ({', '.join(changed)}); "
                "pass a new folder for --out, or the same settings to resume"
            )
            raise BadInput(msg)
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / MARKER) as tmp:
        tmp.write_text(json.dumps(settings.record(), indent=1, sort_keys=True))


def predict_slide(idx: Any, st: Any, cohort: str, slide_id: str, settings: PredictSettings) -> SlideResult:
    """Predict one slide into its file; a data problem fails this slide only (named in the result)."""
    from embedstore.prediction import predict

    start = time.perf_counter()
    path = slide_file(Path(settings.out), cohort, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        adata = predict(
            idx, st, slide_ids=[slide_id], cohort=cohort, k=settings.k, aggregator=settings.aggregator,
            exclude_own=settings.exclude_own, images=settings.images, out=path,
        )  # fmt: skip
    except EmbedstoreError as e:
        return SlideResult(slide_id, "failed", 0, time.perf_counter() - start, str(e))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # a damaged file of this slide
        return SlideResult(slide_id, "failed", 0, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    return SlideResult(slide_id, "done", adata.n_obs, time.perf_counter() - start)


def _predict_here(todo: list[tuple[str, str]], settings: PredictSettings) -> dict[tuple[str, str], SlideResult]:
    from embedstore.index_folder import load_index
    from embedstore.store import open_store

    if not todo:
        return {}
    idx, st = load_index(settings.index), open_store(settings.store)
    results = {}
    for cohort, slide in todo:
        results[cohort, slide] = result = predict_slide(idx, st, cohort, slide, settings)
        step("%s: %s (%d tiles, %.1f s) %s", slide, result.status, result.n_tiles, result.seconds, result.reason)
    return results


class PredictActor:
    """Ray Data actor: one loaded index and store, predicting a slide per call (settings set per run)."""

    settings: PredictSettings
    threads: int

    def __init__(self) -> None:
        import faiss

        from embedstore.index_folder import load_index
        from embedstore.store import open_store

        faiss.omp_set_num_threads(self.threads)
        self.index = load_index(self.settings.index)
        self.store = open_store(self.settings.store)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"cohort": [], "slide_id": [], "status": [], "n_tiles": [], "seconds": [], "reason": []}
        for cohort, slide in zip(batch["cohort"], batch["slide_id"], strict=True):
            r = predict_slide(self.index, self.store, str(cohort), str(slide), self.settings)
            for key, value in (("cohort", str(cohort)), *dataclasses.asdict(r).items()):
                rows[key].append(value)
        return rows


def _predict_on_ray(
    ray: Any, todo: list[tuple[str, str]], settings: PredictSettings
) -> dict[tuple[str, str], SlideResult]:
    if not todo:
        return {}
    _ray.check_nodes_see(
        ray, [settings.index, settings.store], "the index and the store", shared_dir=Path(settings.out)
    )
    nodes = _ray.alive_nodes(ray)
    cpus = max(1, min(int(n["Resources"].get("CPU", 1)) for n in nodes))
    actor = type("PredictActor", (PredictActor,), {"settings": settings, "threads": cpus})
    items = [{"cohort": c, "slide_id": s} for c, s in todo]
    data = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=len(nodes)), num_cpus=cpus
    )
    results: dict[tuple[str, str], SlideResult] = {}
    with _ray.cluster_errors("the slides written are kept, rerun to predict the rest"):
        for batch in data.iter_batches(batch_format="numpy", batch_size=None):
            for i in range(len(batch["slide_id"])):
                r = SlideResult(
                    str(batch["slide_id"][i]), str(batch["status"][i]), int(batch["n_tiles"][i]),
                    float(batch["seconds"][i]), str(batch["reason"][i]),
                )  # fmt: skip
                results[str(batch["cohort"][i]), r.slide_id] = r
                step("%s: %s (%d tiles, %.1f s) %s", r.slide_id, r.status, r.n_tiles, r.seconds, r.reason)
    for key in todo:  # never a silent gap: a slide Ray did not return is a failure, and a rerun resumes it
        if key not in results:
            results[key] = SlideResult(
                key[1], "failed", 0, 0.0, "no result came back from the cluster; rerun to resume"
            )
    return results
