"""Long work shows progress on stderr by default; ``--quiet`` leaves only results and errors."""

from __future__ import annotations

import io
import logging
import sys

from cli_helpers import run


def test_index_build_shows_progress_unless_quiet(store, recipe, tmp_path):
    shown = run("index", "build", recipe, "--store", store, "--out", tmp_path / "a.index")
    assert shown.returncode == 0, shown.stderr
    assert "embedstore: " in shown.stderr
    assert "epoch" in shown.stderr
    quiet = run("--quiet", "index", "build", recipe, "--store", store, "--out", tmp_path / "b.index")
    assert quiet.returncode == 0, quiet.stderr
    assert "embedstore: " not in quiet.stderr


def test_progress_lines_follow_a_redirected_stderr(monkeypatch):
    from embedstore import _progress

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    _progress.step("fold %s: %d spots", "C2", 187)
    assert buffer.getvalue() == "embedstore: fold C2: 187 spots\n"
    logging.getLogger("embedstore.progress").setLevel(logging.WARNING)
    try:
        _progress.step("hidden")
    finally:
        logging.getLogger("embedstore.progress").setLevel(logging.INFO)
    assert "hidden" not in buffer.getvalue()


def test_embed_says_a_line_per_slide_and_nothing_when_quiet(cohort, tmp_path):
    shown = run("embed", cohort.root, "--store", tmp_path / "a", "--workers", "0")
    assert shown.returncode == 0, shown.stderr
    for section in cohort.sections:
        assert f"embedstore: {section.section}: " in shown.stderr
    assert "tile/s" not in shown.stderr  # no bar written into a pipe or a log file
    quiet = run("--quiet", "embed", cohort.root, "--store", tmp_path / "b", "--workers", "0")
    assert quiet.returncode == 0, quiet.stderr
    assert "embedstore: " not in quiet.stderr  # warnings stay; progress goes
    assert "tile/s" not in quiet.stderr
