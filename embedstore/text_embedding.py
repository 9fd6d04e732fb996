"""Text embeddings of ST spots: each spot's gene sentence, embedded once by a CLIP/CoCa text tower.

OmiCLIP (Loki) maps an H&E tile and the *gene sentence* of its spot (its most expressed gene
symbols, :mod:`embedstore.sentences`) into one space; Loki predicts expression by image-text
similarity. :func:`embed_text` writes the sentences of a store's ST sections and embeds them
with the text tower of the encoder whose image tower embedded the tiles, into the store, as
the embeddings of encoder ``<encoder>-text`` (:func:`text_table`)::

    STORE/embeddings/encoder=<encoder>-text/cohort=<c>/slide_id=<s>/tiles.parquet   one row per spot

So every reader of embeddings serves them unchanged: :meth:`Store.read_embeddings`, the
fingerprint checks, ``embedstore check`` and the SQL view ``embeddings_<encoder>_text``. Slides
are written as images are (a per-slide lock, batches staged durably, one atomic publish), so a
killed run resumes and a rerun skips what is done.

Rows: ``tile_id`` and ``spot_id`` are the spot id, ``x``, ``y`` the spot centre (level-0 pixels,
rounded as spot-centred tiles are). ``mpp`` and ``size_px`` (the tile geometry every embedding
file records) are those of the image tiles the text pairs with: the geometry of the slide's
image embeddings by the same encoder when the store has them, else the geometry a default
``embedstore embed`` gives that encoder's tiles (its ``target_mpp`` at 224 px). A sentence has
no pixels; the geometry says which tiles its vector is meant to be compared with.

The stored encoder metadata is the text tower's (:meth:`TextEncoder.metadata`, family
``open_clip-text``) with the name ``<encoder>-text``, ``image_fingerprint`` (the image tower of
the same checkpoint, see :func:`check_text_pairs`), the image encoder's name and the sentence
settings; its fingerprint hashes the text tower's fingerprint with the sentence settings, so
sentences of another ``top_n`` never mix with these.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._params import Int, validated
from embedstore._progress import counter, step
from embedstore._schema import Col, fingerprint, geometry
from embedstore.errors import BadInput, DamagedFile, FingerprintMismatch
from embedstore.slide_jobs import SlideJob, SlideReport, SlideResult, results_table, slide_failure

__all__ = [
    "TEXT_SUFFIX",
    "TextEmbedReport",
    "check_text_pairs",
    "embed_text",
    "has_text_tower",
    "read_text_embeddings",
    "text_metadata",
    "text_table",
]

LOG = logging.getLogger(__name__)

TEXT_SUFFIX = "-text"
FAMILY = "open_clip-text"
# Tile side of the placeholder geometry: what `embedstore embed` tiles at by default.
DEFAULT_SIZE_PX = 224


def text_table(encoder: str) -> str:
    """The encoder name under which the text embeddings of ``encoder`` are stored: ``"<encoder>-text"``."""
    return f"{encoder}{TEXT_SUFFIX}"


def has_text_tower(encoder: str) -> bool:
    """True when ``encoder`` has a text tower (an open_clip CLIP/CoCa such as ``omiclip``); nothing is built."""
    from embedstore.encoders import has_text_tower as _has

    return _has(encoder)


@dataclasses.dataclass
class TextEmbedReport(SlideReport):
    """Per-slide outcome of :func:`embed_text` (``ok``, ``summary()``), and where the table is."""

    store: Path
    encoder: str  # the image encoder whose text tower ran
    table: str  # the encoder name the text embeddings are stored under
    fingerprint: str
    results: list[SlideResult]
    n_empty: int = 0  # spots whose gene sentence is empty: not embedded

    def summary(self) -> str:
        """A plain-text table, one line per slide, and a line on spots left out."""
        text = results_table(self.results)
        if self.n_empty:
            text += f"\n{self.n_empty} spot(s) with an empty gene sentence (no expressed gene) were not embedded"
        return text


def _table_fingerprint(text_fingerprint: str, settings: dict[str, Any]) -> str:
    """The text table's fingerprint: the text tower's, hashed with the sentence settings."""
    return fingerprint(text_fingerprint, {"sentences": settings})


def _published(store: Any, table: str, cohort: str | Sequence[str] | None, slide_ids: Sequence[str] | None) -> list:
    """``(cohort, slide_id)`` of the selected slides with a published text file."""
    from embedstore.store._writer import SLIDE_FILE

    cohorts = [cohort] if isinstance(cohort, str) else None if cohort is None else list(cohort)
    wanted = None if slide_ids is None else {str(s) for s in ([slide_ids] if isinstance(slide_ids, str) else slide_ids)}
    out = []
    for p in sorted((store.root / "embeddings" / f"encoder={table}").glob(f"cohort=*/slide_id=*/{SLIDE_FILE}")):
        c, s = p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1]
        if (cohorts is None or c in cohorts) and (wanted is None or s in wanted):
            out.append((c, s))
    return out


def _sections_with_spots(store: Any, cohort: str | Sequence[str] | None) -> bool:
    """Whether the store holds the spots of an ST section (of ``cohort``); a glob, nothing read."""
    from embedstore.store._expression import SPOTS_FILE

    cohorts = [cohort] if isinstance(cohort, str) else None if cohort is None else list(cohort)
    return any(
        cohorts is None or p.parent.parent.name.split("=", 1)[1] in cohorts
        for p in (store.root / "spots").glob(f"cohort=*/slide_id=*/{SPOTS_FILE}")
    )


def _other_settings(store: Any, info: Any, meta: dict[str, Any], encoder: str) -> BadInput:
    """The one line refusing to add text of other settings to a slide published with other ones."""
    found = info.encoder
    was_top_n = (found.get("sentences") or {}).get("top_n")
    was_weights = found.get("weights")
    now_top_n = meta["sentences"]["top_n"]
    fix = f"embedstore embed-text {store.root} --encoder {encoder} --top-n {was_top_n}"
    if was_weights and not str(was_weights).startswith("random-init"):
        fix += f" --weights {str(was_weights).removeprefix('file:')}"
    msg = (
        f"{info.path}: slide {info.path.parent.name.split('=', 1)[1]} holds text embeddings of fingerprint "
        f"{info.fingerprint} (top_n={was_top_n}, weights {was_weights}), this run's is {meta['fingerprint']} "
        f"(top_n={now_top_n}, weights {meta['weights']}); rerun with those settings ({fix}), or remove "
        f"{info.path.parents[2]} to embed the text anew"
    )
    return BadInput(msg)


def _spot_centres(store: Any, cohort: str, slide_id: str) -> dict[str, tuple[int, int]]:
    """Spot id -> level-0 pixel centre, rounded as spot-centred tiles round it."""
    from embedstore.store._expression import SPOTS_FILE
    from embedstore.store._integrity import read_all, repair_hint

    path = store.root / "spots" / f"cohort={cohort}" / f"slide_id={slide_id}" / SPOTS_FILE
    if not path.is_file():
        msg = f"{path}: no spots stored for slide {slide_id} of cohort {cohort}; embed the ST data set first"
        raise BadInput(msg)
    t = read_all(path, repair_hint(store.root), [Col.SPOT_ID, Col.X, Col.Y])
    xs = np.floor(t.column(Col.X).to_numpy() + 0.5).astype(np.int64)
    ys = np.floor(t.column(Col.Y).to_numpy() + 0.5).astype(np.int64)
    return {s: (int(x), int(y)) for s, x, y in zip(t.column(Col.SPOT_ID).to_pylist(), xs, ys, strict=True)}


def _pairing_geometry(store: Any, encoder: str, cohort: str, slide_id: str, cfg: Any) -> dict[str, Any]:
    """The geometry of the slide's image embeddings by ``encoder``, else that of a default embed run."""
    try:
        info = store.published_slide(encoder, cohort, slide_id)
    except (DamagedFile, BadInput):
        info = None
    if info is not None:
        return info.geometry
    return geometry(cfg.target_mpp, DEFAULT_SIZE_PX)


@validated(top_n=Int(min=1))
def embed_text(
    store: str | Path,
    encoder: str = "omiclip",
    cohort: str | Sequence[str] | None = None,
    slide_ids: Sequence[str] | None = None,
    *,
    weights: str | None = None,
    top_n: int = 50,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> TextEmbedReport:
    """Write the gene sentences of a store's ST sections and embed each once with ``encoder``'s text tower.

    Slides already complete with the same fingerprint (weights and sentence settings) are
    skipped; slides a killed run left partial resume from their staged batches. Spots whose
    sentence is empty (no expressed gene) are not embedded; the report counts them.

    Parameters
    ----------
    store
        Store folder holding ST sections (spots and expression, from ``embedstore embed``).
    encoder
        An encoder with a text tower: ``omiclip``, ``test-openclip`` or ``open_clip:<arch>``.
    cohort, slide_ids
        Sections to do; all by default.
    weights
        The full CLIP/CoCa checkpoint (``hf-hub:org/repo``, ``local-dir:/path`` or a file); use the
        one the images were embedded with (see :func:`check_text_pairs`).
    top_n
        Most genes in a sentence (OmiCLIP: 50).
    batch_size
        Sentences per forward pass (and per staged batch).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
    progress
        A line per slide, and a bar on a terminal.

    Raises
    ------
    BadInput
        One line, with nothing written: an encoder without a text tower, no expression in the
        selection, weights of another architecture, or slides already holding text embeddings
        of other settings (other ``top_n`` or weights).
    MissingWeights
        The weights are not available (a gated repository without access, not in the cache).
    """
    from embedstore.encoders import create_text_encoder
    from embedstore.sentences import read_sentences, sentence_settings, write_sentences
    from embedstore.store import open_store

    if not has_text_tower(encoder):
        create_text_encoder(encoder)  # raises the one line: unknown name, or no text tower
    settings = sentence_settings(top_n)
    st = open_store(store)  # an existing store: read-only first, so a wrong path creates nothing
    if not _sections_with_spots(st, cohort):
        where = "" if cohort is None else f" of cohort {cohort if isinstance(cohort, str) else ', '.join(cohort)}"
        msg = (
            f"{st.root}: no spots/expression{where}; embed an ST data set into it first "
            "(text embeddings are of the gene sentences of ST spots)"
        )
        raise BadInput(msg)
    st = open_store(st.root, read_only=False)
    st.check_writable()
    table = text_table(encoder)
    enc = create_text_encoder(encoder, weights=weights, device=device)
    meta = {
        **enc.metadata(),
        "name": table,
        "family": FAMILY,
        "fingerprint": _table_fingerprint(enc.fingerprint, settings),
        "text_fingerprint": enc.fingerprint,
        "image_encoder": enc.name,
        "sentences": settings,
    }
    # Other settings over published slides: refused before the sentences are rewritten.
    for c, s in _published(st, table, cohort, slide_ids):
        try:
            info = st.published_slide(table, c, s)
        except DamagedFile:
            continue  # moved aside and embedded again below
        if info is not None and info.fingerprint != meta["fingerprint"]:
            raise _other_settings(st, info, meta, encoder)
    write_sentences(st, cohort=cohort, slide_ids=slide_ids, top_n=top_n)
    sentences = read_sentences(st, cohort=cohort, slide_ids=slide_ids)
    sections: dict[tuple[str, str], list[int]] = {}
    keys = zip(sentences.column(Col.COHORT).to_pylist(), sentences.column(Col.SLIDE_ID).to_pylist(), strict=True)
    for i, key in enumerate(keys):
        sections.setdefault(key, []).append(i)
    LOG.info("embedding the gene sentences of %d section(s) with the text tower of %s", len(sections), enc.name)
    results: list[SlideResult] = []
    n_empty = 0
    for (c, s), idx in sections.items():
        rows = sentences.take(pa.array(idx, pa.int64()))
        empty = int((rows.column(Col.N_GENES).to_numpy() == 0).sum())
        n_empty += empty
        if empty:
            LOG.info("%s/%s: %d spot(s) with an empty gene sentence (no expressed gene) not embedded", c, s, empty)
        start = time.perf_counter()
        with st.lock_slide(table, c, s):
            try:
                result = _embed_section(st, enc, meta, c, s, rows, batch_size, progress, weights, top_n)
            except Exception as e:  # noqa: BLE001  (one broken section must not stop the others; the summary names it)
                folder = st.root / "embeddings" / f"encoder={table}" / f"cohort={c}" / f"slide_id={s}"
                result = slide_failure(SlideJob(s, folder), e, time.perf_counter() - start, st.root)
        results.append(result)
    return TextEmbedReport(st.root, enc.name, table, meta["fingerprint"], results, n_empty)


def _embed_section(
    st: Any,
    enc: Any,
    meta: dict[str, Any],
    cohort: str,
    slide_id: str,
    rows: pa.Table,
    batch_size: int,
    progress: bool,
    weights: str | None,
    top_n: int,
) -> SlideResult:
    """Embed the non-empty sentences of one section not staged yet, and publish it (hold its lock)."""
    start = time.perf_counter()
    table = meta["name"]
    try:
        info = st.published_slide(table, cohort, slide_id)
    except DamagedFile as e:
        LOG.warning("%s: %s; moved it to %s and embedding the text again", e.path, e.problem, st.quarantine(e.path))
        info = None
    if info is not None:
        if info.fingerprint != meta["fingerprint"]:  # published meanwhile by a run of other settings
            raise _other_settings(st, info, meta, enc.name)
        st.clear_stale_staging(table, cohort, slide_id)
        return SlideResult(slide_id, "skipped", 0, 0.0, "already in the store")
    keep = np.asarray(rows.column(Col.N_GENES).to_numpy()) > 0
    spot_ids = [str(v) for v, k in zip(rows.column(Col.SPOT_ID).to_pylist(), keep, strict=True) if k]
    texts = [str(v) for v, k in zip(rows.column(Col.SENTENCE).to_pylist(), keep, strict=True) if k]
    if not spot_ids:
        reason = "no spot has a gene sentence (no expressed gene); nothing to embed"
        LOG.warning("%s/%s: %s", cohort, slide_id, reason)
        return SlideResult(slide_id, "skipped", 0, 0.0, reason)
    centres = _spot_centres(st, cohort, slide_id)
    missing = [s for s in spot_ids if s not in centres]
    if missing:
        msg = f"{st.root}: spots {', '.join(missing[:3])} of slide {slide_id} have a gene sentence but no spot row; run embedstore embed-text again"
        raise BadInput(msg)
    source = {
        "kind": "text",
        "data": str(st.root),
        "cohort": cohort,
        "slide_id": slide_id,
        "encoder": enc.name,
        "table": table,
        "weights": weights,
        "top_n": top_n,
    }
    writer = st.slide_writer(meta, cohort, slide_id, None, len(spot_ids), source)
    geom = writer.geometry or _pairing_geometry(st, enc.name, cohort, slide_id, enc.cfg)
    done = writer.done_tile_ids()
    todo = [i for i, s in enumerate(spot_ids) if s not in done]
    if done:
        LOG.info("%s: resuming, %d of %d spots already staged", slide_id, len(spot_ids) - len(todo), len(spot_ids))
    tiles = pa.table(
        {
            Col.SLIDE_ID: pa.array([slide_id] * len(spot_ids), pa.string()),
            Col.TILE_ID: pa.array(spot_ids, pa.string()),
            Col.SPOT_ID: pa.array(spot_ids, pa.string()),
            Col.X: pa.array([centres[s][0] for s in spot_ids], pa.int64()),
            Col.Y: pa.array([centres[s][1] for s in spot_ids], pa.int64()),
            Col.MPP: pa.array([geom["mpp"]] * len(spot_ids), pa.float64()),
            Col.SIZE_PX: pa.array([geom["size_px"]] * len(spot_ids), pa.int32()),
            Col.PADDED: pa.array([False] * len(spot_ids), pa.bool_()),
        }
    )
    bar = counter(len(todo) if progress else 0, slide_id, unit="spot")
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        vectors = enc.encode([texts[i] for i in idx], batch_size=batch_size)
        writer.append(tiles.take(pa.array(idx, pa.int64())), vectors)
        bar(len(idx))
    bar(0, close=True)
    writer.commit(tile_ids=spot_ids)
    seconds = time.perf_counter() - start
    if progress:
        step("%s: %d gene sentences embedded (%.1f s)", slide_id, len(spot_ids), seconds)
    return SlideResult(slide_id, "done", len(spot_ids), seconds)


def check_text_pairs(image_meta: dict[str, Any], text_meta: dict[str, Any], where: str) -> None:
    """Raise :class:`FingerprintMismatch` unless the text embeddings come from the checkpoint the images came from.

    Parameters
    ----------
    image_meta
        Encoder metadata of the image embeddings (``fingerprint``, ``name``).
    text_meta
        Encoder metadata of the text embeddings (:func:`text_metadata`; ``image_fingerprint``).
    where
        The file or table the text comes from, for the message.
    """
    found = text_meta.get("image_fingerprint")
    # stain-normalised images hash the setting into their fingerprint; the checkpoint's is kept beside it
    if found != image_meta.get("encoder_fingerprint", image_meta.get("fingerprint")):
        enc = image_meta.get("name") or text_meta.get("image_encoder") or "ENCODER"
        recorded = str(image_meta.get("weights") or "")
        same = (
            recorded.removeprefix("file:") if recorded and not recorded.startswith("random-init") else "<same weights>"
        )
        msg = (
            f"{where}: text embeddings of the checkpoint with image fingerprint {found}, but the images have "
            f"{image_meta.get('fingerprint')}; embed the text with the same checkpoint as the images: "
            f"embedstore embed-text STORE --encoder {enc} --weights {same}"
        )
        raise FingerprintMismatch(msg)


def _no_text(store: Any, encoder: str) -> BadInput:
    return BadInput(
        f"no text embeddings for encoder {encoder} in {store.root}; run embedstore embed-text {store.root} --encoder {encoder}"
    )


def _open(store: Any) -> Any:
    from embedstore.store import Store, open_store

    return store if isinstance(store, Store) else open_store(store)


def text_metadata(
    store: Any, encoder: str, cohort: str | Sequence[str] | None = None, slide_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """The encoder metadata stored with ``encoder``'s text embeddings (and their ``"geometry"``).

    Holds ``fingerprint`` (of the table), ``image_fingerprint``, ``text_fingerprint``,
    ``sentences`` (the settings), ``weights`` and ``image_encoder``.
    """
    st = _open(store)
    table = text_table(encoder)
    if not (st.root / "embeddings" / f"encoder={table}").is_dir():
        raise _no_text(st, encoder)
    return st.encoder_metadata(table, cohort, slide_ids)


def read_text_embeddings(
    store: Any, encoder: str, cohort: str | Sequence[str] | None = None, slide_ids: Sequence[str] | None = None
) -> tuple[pa.Table, np.ndarray]:
    """``encoder``'s text embeddings of the selected slides: metadata table and ``(N, D)`` float32.

    One row per spot with a non-empty gene sentence (``spot_id`` joins the spots and the image
    embeddings); see :meth:`Store.read_embeddings` for the order and the checks.
    """
    st = _open(store)
    table = text_table(encoder)
    if not (st.root / "embeddings" / f"encoder={table}").is_dir():
        raise _no_text(st, encoder)
    return st.read_embeddings(table, cohort, slide_ids)
