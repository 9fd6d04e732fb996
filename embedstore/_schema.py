"""Column names, Arrow schemas, metadata keys and fingerprints: the on-disk contract.

Nothing else in the package spells a column name; every module imports it from here.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pyarrow as pa

from embedstore.errors import BadInput, FingerprintMismatch, GeometryMismatch

SCHEMA_VERSION = "1"

# How tiles are resized from the pyramid level to the target µm/px; part of the tile geometry.
RESAMPLE = "bilinear"

# Key-value metadata carried by every Parquet file and index manifest we write.
META_SCHEMA_VERSION = "embedstore.schema_version"
META_ENCODER = "embedstore.encoder"
META_KIND = "embedstore.kind"
META_GEOMETRY = "embedstore.geometry"  # JSON: the tile geometry (mpp, size_px, resample) of an embedding file
META_GENES = "embedstore.genes"  # JSON list of every measured gene of an expression file (zeros are not stored)
META_N_TILES = (
    "embedstore.n_tiles"  # tiles of the slide (its tile table's rows); a published slide file holds exactly these
)
META_SOURCE = (
    "embedstore.source"  # JSON: where a slide file came from and how it was embedded (for `embedstore check --repair`)
)

# AnnData keys of spot and prediction objects (scanpy/squidpy plot obsm["spatial"]).
OBSM_SPATIAL = "spatial"
UNS_KEY = "embedstore"  # uns[UNS_KEY]: mpp, spot_diameter_um, image_path, technology, slide_id


class Col:
    """Column names of tile, embedding and expression tables."""

    COHORT = "cohort"
    SLIDE_ID = "slide_id"
    TILE_ID = "tile_id"
    SPOT_ID = "spot_id"
    X = "x"  # level-0 pixel column of the tile centre
    Y = "y"  # level-0 pixel row of the tile centre
    MPP = "mpp"  # µm/px the tile was sampled at
    SIZE_PX = "size_px"  # tile side in pixels at ``mpp``
    PADDED = "padded"  # tile crosses the slide border and was padded
    ENCODER = "encoder"
    FINGERPRINT = "fingerprint"
    EMBEDDING = "embedding"
    GENE = "gene"
    COUNT = "count"
    PATIENT = "patient"
    KEY = "key"  # an exemplar's search vector in an index's exemplars.parquet
    EXPRESSION = "expression"  # an exemplar's log-normalised expression over the panel
    TOTAL_COUNTS = "total_counts"
    SENTENCE = "sentence"  # a spot's OmiCLIP/Loki gene sentence (embedstore.sentences)
    N_GENES = "n_genes"  # gene symbols in that sentence


def tile_schema() -> pa.Schema:
    """Arrow schema of a tile table (output of tiling, input of embedding)."""
    return pa.schema(
        [
            pa.field(Col.SLIDE_ID, pa.string(), nullable=False),
            pa.field(Col.TILE_ID, pa.string(), nullable=False),
            pa.field(Col.SPOT_ID, pa.string(), nullable=True),
            pa.field(Col.X, pa.int64(), nullable=False),
            pa.field(Col.Y, pa.int64(), nullable=False),
            pa.field(Col.MPP, pa.float64(), nullable=False),
            pa.field(Col.SIZE_PX, pa.int32(), nullable=False),
            pa.field(Col.PADDED, pa.bool_(), nullable=False),
        ]
    )


def embedding_schema(dim: int, encoder_meta: dict[str, Any] | None = None) -> pa.Schema:
    """Arrow schema of an embedding table: the tile columns plus cohort, encoder and vector.

    Parameters
    ----------
    dim
        Length of the embedding vector (stored as ``fixed_size_list<float32>[dim]``).
    encoder_meta
        JSON-able encoder metadata (name, family, cfg, fingerprint) put into the
        schema's key-value metadata; ``None`` leaves it out.
    """
    tiles = tile_schema()
    fields = [
        pa.field(Col.COHORT, pa.string(), nullable=False),
        *tiles,
        pa.field(Col.ENCODER, pa.string(), nullable=False),
        pa.field(Col.FINGERPRINT, pa.string(), nullable=False),
        pa.field(Col.EMBEDDING, pa.list_(pa.field("element", pa.float32(), nullable=False), int(dim)), nullable=False),
    ]
    meta = {META_SCHEMA_VERSION: SCHEMA_VERSION}
    if encoder_meta is not None:
        meta[META_ENCODER] = json.dumps(encoder_meta, sort_keys=True)
    return pa.schema(fields, metadata=meta)


def spots_schema() -> pa.Schema:
    """Arrow schema of a spots table (one row per measured spot of an ST section)."""
    return pa.schema(
        [
            pa.field(Col.COHORT, pa.string(), nullable=False),
            pa.field(Col.SLIDE_ID, pa.string(), nullable=False),
            pa.field(Col.SPOT_ID, pa.string(), nullable=False),
            pa.field(Col.X, pa.float64(), nullable=False),
            pa.field(Col.Y, pa.float64(), nullable=False),
            pa.field(Col.PATIENT, pa.string(), nullable=True),
            pa.field(Col.TOTAL_COUNTS, pa.float64(), nullable=False),
        ],
        metadata={META_SCHEMA_VERSION: SCHEMA_VERSION},
    )


def expression_schema(count_type: pa.DataType | None = None) -> pa.Schema:
    """Arrow schema of a long, sparse expression table: one row per nonzero (spot, gene) count.

    ``count_type`` is int32 (raw counts, the default) or float32 (non-integer values).
    """
    count_type = pa.int32() if count_type is None else count_type
    return pa.schema(
        [
            pa.field(Col.COHORT, pa.string(), nullable=False),
            pa.field(Col.SLIDE_ID, pa.string(), nullable=False),
            pa.field(Col.SPOT_ID, pa.string(), nullable=False),
            pa.field(Col.GENE, pa.string(), nullable=False),
            pa.field(Col.COUNT, count_type, nullable=False),
        ],
        metadata={META_SCHEMA_VERSION: SCHEMA_VERSION},
    )


def tile_id(x: int, y: int) -> str:
    """Stable id of a tile within its slide: its level-0 centre, ``"{x}_{y}"``."""
    return f"{int(x)}_{int(y)}"


def fingerprint(weights_digest: str, preprocessing: dict[str, Any]) -> str:
    """Hash of the weights' digest and the preprocessing settings (16 hex chars).

    Parameters
    ----------
    weights_digest
        SHA-256 of the weight bytes, or a name+seed string for weight-free encoders.
    preprocessing
        JSON-serialisable settings that change the pixels the model sees
        (input size, mean, std, interpolation, target µm/px, ...).
    """
    payload = json.dumps({"weights": weights_digest, "pre": preprocessing}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_fingerprint(expected: str, found: str, where: str) -> None:
    """Raise :class:`FingerprintMismatch` when two fingerprints differ.

    Parameters
    ----------
    expected
        Fingerprint the consumer (aligner, index) was built with.
    found
        Fingerprint of the embeddings offered to it.
    where
        File or table the ``found`` fingerprint comes from, for the message.
    """
    if expected != found:
        msg = (
            f"{where}: embeddings have encoder fingerprint {found}, but {expected} is required; "
            "embed with the same encoder and weights, or rebuild the index from these embeddings"
        )
        raise FingerprintMismatch(msg)


def geometry(mpp: float, size_px: int, resample: str = RESAMPLE) -> dict[str, Any]:
    """The tile geometry of embeddings: µm/px sampled at, tile side in pixels, resampling filter.

    Two embeddings are comparable only when their encoder fingerprints *and* geometries agree.
    """
    return {"mpp": round(float(mpp), 6), "size_px": int(size_px), "resample": str(resample)}


def describe_geometry(geom: dict[str, Any] | None) -> str:
    """``"0.5 µm/px x 224 px (bilinear)"``, or ``"unknown geometry"``."""
    if not geom:
        return "unknown geometry"
    return f"{geom.get('mpp')} µm/px x {geom.get('size_px')} px ({geom.get('resample', '?')})"


def check_geometry(expected: dict[str, Any] | None, found: dict[str, Any] | None, where: str) -> None:
    """Raise :class:`GeometryMismatch` naming both geometries when they differ.

    Parameters
    ----------
    expected
        Geometry the consumer (index, slide file being resumed) was made with.
    found
        Geometry of the embeddings offered to it.
    where
        File or table ``found`` comes from, for the message.
    """
    if expected is None or found is None:
        return
    if geometry(**expected) != geometry(**found):
        msg = (
            f"{where}: embeddings were tiled at {describe_geometry(found)}, but {describe_geometry(expected)} "
            "is required; embed with the same --target-mpp and --size, or rebuild from these embeddings"
        )
        raise GeometryMismatch(msg)


def parse_geometry(value: Any, where: str) -> dict[str, Any] | None:
    """A recorded tile geometry, checked: ``None`` stays ``None``, anything else must be a geometry.

    Parameters
    ----------
    value
        What a manifest, checkpoint config or file metadata holds under its geometry key.
    where
        The file and key, for the message.

    Raises
    ------
    BadInput
        ``value`` is not ``{mpp: > 0, size_px: int > 0, resample: str}``.
    """
    if value is None:
        return None
    ok = (
        isinstance(value, dict)
        and set(value) == {"mpp", "size_px", "resample"}
        and isinstance(value["mpp"], int | float)
        and not isinstance(value["mpp"], bool)
        and math.isfinite(value["mpp"])
        and value["mpp"] > 0
        and isinstance(value["size_px"], int)
        and not isinstance(value["size_px"], bool)
        and value["size_px"] > 0
        and isinstance(value["resample"], str)
    )
    if not ok:
        msg = f"{where}: tile geometry {value!r} must be {{mpp: µm/px > 0, size_px: pixels > 0, resample: name}}; rewrite it from the embeddings"
        raise BadInput(msg)
    return geometry(**value)
