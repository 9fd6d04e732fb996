"""Typed errors. Messages read ``<file or name>: <what is wrong>; <what to do>``."""

from __future__ import annotations

__all__ = [
    "BadInput",
    "EmbedstoreError",
    "FingerprintMismatch",
    "GeometryMismatch",
    "MissingDependency",
    "MissingWeights",
]


class EmbedstoreError(Exception):
    """Base class of every error embedstore raises on purpose.

    The command line turns it into one line on stderr and exit code 2.
    """


class BadInput(EmbedstoreError, ValueError):
    """A file or argument given by the user cannot be used as it is."""


class MissingWeights(EmbedstoreError, FileNotFoundError):
    """Encoder weights are not in the hub cache, the local folder, or are gated."""


class MissingDependency(EmbedstoreError, ImportError):
    """An optional package is needed for this call; the message says how to install it."""


class FingerprintMismatch(EmbedstoreError):
    """Embeddings, an aligner or an index were made by different encoders or settings."""


class GeometryMismatch(FingerprintMismatch):
    """Embeddings were tiled at another µm/px, tile size or resampling than required."""
