"""Running the ``embedstore`` command in a subprocess, and the one-line error contract."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "embedstore"]


def run(*args: object) -> subprocess.CompletedProcess:
    """``embedstore ARGS...``, output captured, never raising on a non-zero exit."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and exactly one stderr line holding every needle, besides the progress lines before it."""
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if not _is_progress(ln)]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _is_progress(line: str) -> bool:
    """A line of the ``embedstore.progress`` logger (``embedstore: <step>``), not the error."""
    return line.startswith("embedstore: ") and not line.startswith("embedstore: error: ")
