"""Progress of long work, on stderr: a bar for counted loops, one line per step of a stage.

Lines go through the ``embedstore.progress`` logger, which prints ``embedstore: <message>``
to stderr by default (a library that works for minutes should say so). Silence it with
``embedstore --quiet`` or ``logging.getLogger("embedstore.progress").setLevel(logging.WARNING)``.
Bars are tqdm bars, shown only when stderr is a terminal, and never when the logger is silenced.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (redirections and captures see it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


LOGGER = logging.getLogger("embedstore.progress")
if not LOGGER.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("embedstore: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.propagate = False
if LOGGER.level == logging.NOTSET:  # a level set before this import (``--quiet``) stays
    LOGGER.setLevel(logging.INFO)


def enabled() -> bool:
    """Whether progress is shown (the ``embedstore.progress`` logger is at INFO or below)."""
    return LOGGER.isEnabledFor(logging.INFO)


def step(message: str, *args: Any) -> None:
    """One line for one step of a stage, e.g. ``step("aligner epoch %d: val %.4f", 3, 0.41)``."""
    LOGGER.info(message, *args)


@contextmanager
def stage(message: str, *args: Any) -> Iterator[None]:
    """A line when a stage starts and one with its duration when it ends."""
    text = message % args if args else message
    step("%s ...", text)
    t0 = time.perf_counter()
    yield
    step("%s done (%.1f s)", text, time.perf_counter() - t0)


def bar(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """``items`` wrapped in a tqdm bar when progress is shown on a terminal; else ``items`` itself."""
    if not enabled() or not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def counter(total: int, desc: str, unit: str = "it") -> Callable[..., None]:
    """``update(n, close=False)`` advancing a bar of ``total`` (a no-op when not shown)."""
    if total == 0 or not enabled() or not sys.stderr.isatty():
        return lambda n, close=False: None
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(n: int, close: bool = False) -> None:
        progress.update(n)
        if close:
            progress.close()

    return update
