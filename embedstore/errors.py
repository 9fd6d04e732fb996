"""Typed errors. Messages read ``<file or name>: <what is wrong>; <what to do>``."""

from __future__ import annotations

__all__ = [
    "BadInput",
    "DamagedFile",
    "DiskFull",
    "EmbedstoreError",
    "FingerprintMismatch",
    "GeometryMismatch",
    "MissingDependency",
    "MissingWeights",
]


class EmbedstoreError(Exception):
    """Base class of every error embedstore raises on purpose.

    The command line turns it into one line on stderr and exits with :attr:`exit_code`.
    """

    #: Exit status of the command line: 2 for bad input (the default), 1 for faults of the machine.
    exit_code = 2


class BadInput(EmbedstoreError, ValueError):
    """A file or argument given by the user cannot be used as it is."""


class DamagedFile(BadInput):
    """A store file is truncated, corrupted, empty, or not the file embedstore wrote there.

    ``path`` is the file and ``problem`` what is wrong with it (without the advice), so that a
    caller that repairs it can word its own message.
    """

    def __init__(self, path: object, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path}: {problem}; {fix}")

    def __reduce__(self) -> tuple[type, tuple[object, str, str]]:
        return type(self), (self.path, self.problem, self.fix)


class MissingWeights(EmbedstoreError, FileNotFoundError):
    """Encoder weights are not in the hub cache, the local folder, or are gated."""


class MissingDependency(EmbedstoreError, ImportError):
    """An optional package is needed for this call; the message says how to install it."""


class FingerprintMismatch(EmbedstoreError):
    """Embeddings, an aligner or an index were made by different encoders or settings."""


class GeometryMismatch(FingerprintMismatch):
    """Embeddings were tiled at another µm/px, tile size or resampling than required."""


class DiskFull(EmbedstoreError):
    """The disk, a quota or the file-size limit ran out while writing; the message names the path and the space needed.

    Not the user's input: the command line exits with 1. Nothing half-written is left behind,
    so a rerun after freeing space completes.
    """

    exit_code = 1


class ClusterFailure(EmbedstoreError):
    """The Ray cluster failed in a way Ray could not recover (every retry of a task or actor spent).

    Not the user's input: the command line exits with 1. What was staged is kept, so a rerun
    resumes.
    """

    exit_code = 1
