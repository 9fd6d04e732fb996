"""The README's two set-up commands: the demo runs as written; the test command is what CI runs."""

from __future__ import annotations

import json
import re

from test_readme import README, ROOT, _ok, _sh, command_lines, fenced


def test_setup_commands(tmp_path):
    workdir = tmp_path
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    (block,) = [b for b in fenced("bash") if "scripts/bootstrap" in b]
    demo_line, test_line = command_lines(block)
    boot, demo = (part.strip() for part in demo_line.split("&&"))
    assert boot == "scripts/bootstrap"
    _ok(_sh(boot, ROOT), boot)  # idempotent: a no-op when .venv is current
    out = _ok(_sh(demo, workdir, timeout=1200), demo)
    assert "learned" in out
    assert (workdir / "demo-out" / "report.html").is_file()
    # The demo's numbers the README quotes: "ridge 0.51 < raw kNN 0.65 < bleep 0.71 < learned 0.72 (hvg50)"
    metrics = json.loads((workdir / "demo-out" / "metrics.json").read_text())
    quoted = re.search(r"ridge ([\d.]+) < raw kNN ([\d.]+) < bleep ([\d.]+) < learned ([\d.]+) \(hvg50\)", README)
    assert quoted, "the README quotes the demo's hvg50 ordering"
    for method, value in zip(("ridge", "knn-raw", "bleep", "learned"), quoted.groups(), strict=True):
        assert f"{metrics['methods'][method]['gene_sets']['hvg50']['pearson_mean']:.2f}" == value, method
    # The test command runs this suite itself; check that CI runs exactly it.
    ci = (ROOT / ".ci" / "run").read_text()
    boot2, pytest_cmd = (part.strip() for part in test_line.split("&&"))
    assert boot2 == "scripts/bootstrap"
    assert "scripts/bootstrap" in ci
    assert pytest_cmd in ci.splitlines()
