"""The README's results tables reproduce to the last printed digit from the commands shown beside them.

Each run embeds a real data set and cross-validates every method (minutes on 2 cores), so these
tests are ``slow`` and opt-in: ``.venv/bin/python -m pytest -m slow``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import README, ROOT

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# README table column -> (gene set, statistic, with the SD over slides)
COLUMNS = {
    "hvg50 Pearson": ("hvg50", "pearson", True),
    "mean50 Pearson": ("mean50", "pearson", True),
    "panel Pearson": ("panel", "pearson", True),
    "hvg50 Spearman": ("hvg50", "spearman", False),
    "hvg50 MSE": ("hvg50", "mse", False),
}


def results_sections() -> list[tuple[str, list[dict[str, str]]]]:
    """(command, rows) of each README results table: the command is the one in the table's caption."""
    found = []
    for caption, table in re.findall(
        r"^\*\*[^\n]*?— `(embedstore evaluate [^`]+)`[^\n]*\n\n((?:\|[^\n]*\n)+)", README, re.M
    ):
        lines = [ln.strip().strip("|").split("|") for ln in table.strip().splitlines()]
        head = [c.strip() for c in lines[0]]
        rows = [dict(zip(head, (c.strip().replace("**", "") for c in ln), strict=True)) for ln in lines[2:]]
        found.append((caption, rows))
    return found


def gains_tables() -> list[list[dict[str, str]]]:
    """The rows of each README gains table (one per results table, in the same order)."""
    found = []
    for table in re.findall(r"^\*\*Gains of the additions[^\n]*\*\*\n\n((?:\|[^\n]*\n)+)", README, re.M):
        lines = [ln.strip().strip("|").split("|") for ln in table.strip().splitlines()]
        head = [c.strip() for c in lines[0]]
        found.append([dict(zip(head, (c.strip() for c in ln), strict=True)) for ln in lines[2:]])
    return found


def _gain_cell(metrics: dict, method: str, column: str) -> str:
    """``+context hvg50`` -> the paired gain's mean ± SE, as the README prints it ("—" when not run)."""
    addition, gene_set = column.removeprefix("+").split()
    g = metrics["gains"].get(addition, {}).get(method)
    return "—" if g is None else f"{g[gene_set]['mean']:+.3f} ± {g[gene_set]['se']:.3f}"


def _cell(metrics: dict, method: str, column: str) -> str:
    gene_set, stat, with_sd = COLUMNS[column]
    g = metrics["methods"][method]["gene_sets"][gene_set]
    text = f"{g[f'{stat}_mean']:.3f}"
    return f"{text} ± {g[f'{stat}_std_over_slides']:.3f}" if with_sd else text


def test_readme_has_both_results_tables():
    sections = results_sections()
    assert [cmd.split("--reference ")[1].split()[0] for cmd, _ in sections] == [
        "../shared/data/her2st",
        "../shared/data/stutility-mob",
    ]
    for _, rows in sections:
        assert [r["method"] for r in rows] == ["ridge", "knn-raw", "bleep", "softmax", "idw", "learned"]
    assert [[r["method"] for r in rows] for rows in gains_tables()] == [["ridge", "knn-raw", "bleep", "learned"]] * 2


@pytest.mark.parametrize("section", range(2), ids=["her2st", "stutility-mob"])
def test_results_table_reproduces(section, tmp_path, shared_data):
    command, rows = results_sections()[section]
    (tmp_path / "shared").symlink_to(shared_data.parent)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = work / command.split("--out ")[1].split()[0]
    metrics = json.loads((out / "metrics.json").read_text())
    for row in rows:
        for column in COLUMNS:
            assert _cell(metrics, row["method"], column) == row[column], (row["method"], column)
    for row in gains_tables()[section]:  # the additions' paired gains, from the same run
        for column in row:
            if column != "method":
                assert _gain_cell(metrics, row["method"], column) == row[column], (row["method"], column)


def test_demo_on_real_data(tmp_path, shared_data):
    """`embedstore demo --data ../shared/data/her2st`, as the README says, runs every method on her2st."""
    (tmp_path / "shared").symlink_to(shared_data.parent)
    work = tmp_path / "work"
    work.mkdir()
    command = "embedstore demo --data ../shared/data/her2st"
    assert f"`{command}`" in README
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((work / "demo-out" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ridge", "knn-raw", "bleep", "softmax", "idw", "learned"}


def test_stain_shift_numbers_reproduce(tmp_path):
    """The README's synthetic stain-shift sentence: its command, and every number it quotes."""
    (command,) = re.findall(r"`(\.venv/bin/python scripts/eval_stain_shift\.py [^`]+)`", README)
    (sentence,) = re.findall(r"On synthetic patients whose stain[^\n]*(?:\n[^\n]+)*", README)
    out = tmp_path / command.split("--out ")[1].split()[0]
    line = command.replace(".venv/bin/python", sys.executable).replace(f"--out {out.name}", f"--out {out}")
    r = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    hvg = {m: v["gene_sets"]["hvg50"]["pearson_mean"] for m, v in metrics["methods"].items()}
    gain = lambda a, m: metrics["gains"][a][m]["hvg50"]  # noqa: E731
    quoted = {
        f"learned {hvg['learned']:.3f}",
        f"learned+stain {hvg['learned+stain']:.3f}",
        f"{gain('stain', 'learned')['mean']:+.3f} ± {gain('stain', 'learned')['se']:.3f}",
        f"{gain('context', 'knn-raw')['mean']:+.3f} ± {gain('context', 'knn-raw')['se']:.3f}",
    }
    for text in quoted:
        assert text in " ".join(sentence.split()), text
