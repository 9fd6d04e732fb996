"""Column names, Arrow schemas, metadata keys and fingerprints: the on-disk contract.

Nothing else in the package spells a column name; every module imports it from here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from embedstore.errors import FingerprintMismatch

SCHEMA_VERSION = "1"

# Key-value metadata carried by every Parquet file and index manifest we write.
META_SCHEMA_VERSION = "embedstore.schema_version"
META_ENCODER = "embedstore.encoder"
META_KIND = "embedstore.kind"


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
