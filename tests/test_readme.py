"""Every command and code block of the README runs as written, on the shared data, with meaningful results.

The README is parsed, not copied: each ```bash line, the ```python block and each statement of
the ```sql block run in one working folder laid out as the README assumes (``../shared/data``
beside it, a slide ``slide.svs``, a folder of slides with its ``mpp.csv``, two ST data sets
``ref/`` and ``heldout/``). Each command must have a check below, so a new README line cannot go
untested. The set-up commands are run by ``test_readme_setup.py``, the long "Results" commands
by ``test_readme_results.py`` (``-m slow``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent
HER2ST_SECTIONS = ("C2", "C3", "C4", "C5", "C6")


def fenced(lang: str, text: str = README) -> list[str]:
    """The bodies of the README's fenced code blocks of one language."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(block: str) -> list[str]:
    """Non-empty, non-comment lines of a shell block."""
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def sql_statements(block: str) -> list[str]:
    """The statements of a SQL block, comments dropped."""
    body = "\n".join(ln for ln in block.splitlines() if not ln.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def _sh(line: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _link_her2st_subset(shared: Path, dest: Path, sections: tuple[str, ...]) -> None:
    """A her2st-layout data set holding only ``sections`` (symlinks to the shared files)."""
    src = shared / "her2st" / "data"
    for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs/C"):
        (dest / "data" / sub).mkdir(parents=True)
    for s in sections:
        (dest / "data" / "ST-cnts" / f"{s}.tsv.gz").symlink_to(src / "ST-cnts" / f"{s}.tsv.gz")
        (dest / "data" / "ST-spotfiles" / f"{s}_selection.tsv").symlink_to(src / "ST-spotfiles" / f"{s}_selection.tsv")
        (dest / "data" / "ST-imgs" / "C" / s).symlink_to(src / "ST-imgs" / "C" / s)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data):
    """The folder a README reader works in: ``../shared/data`` beside it and the inputs it names."""
    from embedstore.testing import write_synthetic_slide

    top = tmp_path_factory.mktemp("readme")
    (top / "shared").symlink_to(shared_data.parent)
    work = top / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    write_synthetic_slide(work / "slide.svs", 2048, 1536, mpp=0.5, seed=7)
    (work / "slides").mkdir()
    for i in range(2):  # slides without µm/px in their metadata: it comes from mpp.csv
        write_synthetic_slide(work / "slides" / f"S{i}.tif", 1536, 1536, mpp=None, seed=10 + i)
    (work / "mpp.csv").write_text("slide,mpp\nS0,0.5\nS1,0.5\n")
    _link_her2st_subset(shared_data, work / "ref", HER2ST_SECTIONS[:3])
    _link_her2st_subset(shared_data, work / "heldout", HER2ST_SECTIONS[3:])
    return work


def _ok(r: subprocess.CompletedProcess[str], line: str) -> str:
    assert r.returncode == 0, f"README line failed: {line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _sql_rows(work: Path, query: str) -> list[tuple]:
    import embedstore as es

    return es.sql(work / "store", query, output="arrow").to_pylist()


# What each README command must do beyond exiting 0: keyed by the start of the line.
def _check_info(work: Path, out: str, err: str) -> None:
    assert "0.5 µm/px" in out
    assert re.search(r"tiles\s+\d+ at 0.5 µm/px", out)


def _check_tile(work: Path, out: str, err: str) -> None:
    import pyarrow.parquet as pq

    assert pq.read_table(work / "tiles.parquet").num_rows > 10
    assert (work / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_encoders(work: Path, out: str, err: str) -> None:
    for name in ("builtin", "uni2-h", "virchow2", "efficientnet-lite0"):
        assert name in out


def _check_embed_her2st(work: Path, out: str, err: str) -> None:
    rows = _sql_rows(work, "SELECT slide_id, n_tiles FROM slides WHERE cohort = 'her2st' AND encoder = 'builtin'")
    assert sorted(r["slide_id"] for r in rows) == list(HER2ST_SECTIONS)
    assert sum(r["n_tiles"] for r in rows) > 800


def _check_embed_second_encoder(work: Path, out: str, err: str) -> None:
    rows = _sql_rows(work, "SELECT count(*) AS n FROM embeddings_efficientnet_lite0")
    assert rows[0]["n"] > 800


def _check_embed_slides(work: Path, out: str, err: str) -> None:
    rows = _sql_rows(work, "SELECT slide_id, n_tiles FROM slides WHERE cohort = 'slides' AND encoder = 'builtin'")
    assert sorted(r["slide_id"] for r in rows) == ["S0", "S1"]
    assert all(r["n_tiles"] > 0 for r in rows)


def _check_sql(work: Path, out: str, err: str) -> None:
    assert "C2" in out
    assert "S0" in out


def _check_index_build(work: Path, out: str, err: str) -> None:
    import json

    manifest = json.loads((work / "her2st.index" / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "her2st-builtin"
    panel = json.loads((work / "her2st.index" / "panel.json").read_text())
    assert "ERBB2" in panel["genes"]
    assert "epoch" in err  # progress shown by default


def _check_index_tiles(work: Path, out: str, err: str) -> None:
    import json

    manifest = json.loads((work / "store" / "tile_indexes" / "encoder=builtin" / "manifest.json").read_text())
    covered = sorted(e["slide_id"] for e in manifest["slides"])
    assert covered == sorted([*HER2ST_SECTIONS, "S0", "S1"])
    assert manifest["search"]["recall"] >= 0.95
    assert "tile index built" in out


def _check_search(work: Path, out: str, err: str) -> None:
    import pyarrow.parquet as pq

    hits = pq.read_table(work / "hits.parquet").to_pylist()
    assert len(hits) == 11
    assert (hits[0]["slide_id"], hits[0]["spot_id"]) == ("C2", "23x26")  # the query tile itself first
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert (work / "hits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_predict(work: Path, out: str, err: str) -> None:
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(work / "C2.h5ad")
    assert a.n_obs > 150
    assert "ERBB2" in a.var_names
    assert np.isfinite(a[:, "ERBB2"].X).all()
    assert "C2" in a.uns["spatial"]
    assert list(work.glob("C2*.png"))


def _check_predict_smooth(work: Path, out: str, err: str) -> None:
    import anndata as ad
    import numpy as np

    a, plain = ad.read_h5ad(work / "C2-smooth.h5ad"), ad.read_h5ad(work / "C2.h5ad")
    chosen = a.uns["embedstore"]["smoothing"]
    assert chosen["radius_um"] == 250.0
    assert 0.0 <= chosen["alpha"] <= 1.0  # chosen on the index's reference slides, C2 left out of nothing here
    assert list(a.obs_names) == list(plain.obs_names)
    assert (np.allclose(a.X, plain.X)) == (chosen["alpha"] == 0.0)


def _check_context(work: Path, out: str, err: str) -> None:
    n = {
        view: _sql_rows(work, f"SELECT count(*) AS n FROM {view}")[0]["n"]
        for view in ("embeddings_builtin", "embeddings_builtin_ctx250_600")
    }
    assert n["embeddings_builtin_ctx250_600"] == n["embeddings_builtin"] > 800
    dims = _sql_rows(work, "SELECT encoder, dim FROM encoders WHERE encoder LIKE 'builtin%' ORDER BY encoder")
    assert [d["dim"] for d in dims] == [128, 3 * 128]


def _check_embed_stained(work: Path, out: str, err: str) -> None:
    import embedstore as es

    st = es.open_store(work / "stained")
    assert st.slide_source("builtin", "slides", "S0")["stain_norm"] == "macenko"
    plain = es.open_store(work / "store").encoder_metadata("builtin", cohort="slides")["fingerprint"]
    assert st.encoder_metadata("builtin")["fingerprint"] != plain  # normalised tiles are another input


def _check_evaluate(work: Path, out: str, err: str) -> None:
    import json

    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["split"]["mode"] == "reference-query"
    assert set(metrics["gains"]) == {"context", "smooth", "stain"}  # run by default, each a paired gain
    assert "gain of +context for learned" in out
    assert "learned" in out
    assert (work / "eval" / "report.html").stat().st_size > 10_000


CHECKS: list[tuple[str, Callable[[Path, str, str], None]]] = [
    ("embedstore info slide.svs", _check_info),
    ("embedstore tile slide.svs", _check_tile),
    ("embedstore encoders", _check_encoders),
    ("embedstore embed ../shared/data/her2st --store store --encoder efficientnet-lite0", _check_embed_second_encoder),
    ("embedstore embed ../shared/data/her2st --store store", _check_embed_her2st),
    ("embedstore embed slides/ --store store --mpp-csv mpp.csv", _check_embed_slides),
    ("embedstore sql store", _check_sql),
    ("embedstore index tiles --store store --encoder builtin", _check_index_tiles),
    ("embedstore search --store store --encoder builtin --slide C2", _check_search),
    ("embedstore index build her2st-builtin", _check_index_build),
    (
        "embedstore predict --index her2st.index --store store --slide C2 --exclude-own slide --smooth",
        _check_predict_smooth,
    ),
    ("embedstore predict", _check_predict),
    ("embedstore context store", _check_context),
    ("embedstore embed slides/ --store stained", _check_embed_stained),
    ("embedstore evaluate --reference ref/ --query heldout/", _check_evaluate),
]
# A foundation model whose weights cannot be here: the line must give the documented one-line
# answer naming the repository (and work as written wherever the weights are cached).
GATED = "embedstore embed slides/ --store store --encoder uni2-h"


def _usage_block() -> list[str]:
    blocks = [b for b in fenced("bash") if "embedstore info" in b]
    assert len(blocks) == 1, "the README has one 'Using it' command block"
    return command_lines(blocks[0])


def test_every_usage_line_has_a_check():
    for line in _usage_block():
        assert line.startswith(GATED) or any(line.startswith(p) for p, _ in CHECKS), (
            f"README line without a check in {__file__}: {line}"
        )


@pytest.fixture(scope="module")
def usage_run(workdir):
    """Run the 'Using it' block line by line, in order; returns {line: (stdout, stderr)}."""
    results = {}
    for line in _usage_block():
        r = _sh(line, workdir)
        if line.startswith(GATED):
            results[line] = (r.returncode, r.stdout, r.stderr)
            continue
        results[line] = (r.returncode, _ok(r, line), r.stderr)
    return results


def test_usage_commands(usage_run, workdir):
    for line, (_rc, out, err) in usage_run.items():
        if line.startswith(GATED):
            continue
        check = next(c for p, c in CHECKS if line.startswith(p))
        check(workdir, out, err)


def test_gated_encoder_line_says_how_to_get_weights(usage_run):
    ((rc, _out, err),) = [v for line, v in usage_run.items() if line.startswith(GATED)]
    if rc == 0:  # weights cached on this machine
        return
    lines = err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, err
    assert "MahmoodLab/UNI2-h" in lines[0]
    assert "hf download" in lines[0] or "HF_TOKEN" in lines[0]


def test_python_block(usage_run, workdir, monkeypatch, capsys):
    """The Python block runs as written; its SQL export equals the fast path, its prediction has ERBB2."""
    import numpy as np

    (block,) = [b for b in fenced("python") if "import embedstore as es" in b]
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # the README's own lines
    out = capsys.readouterr().out
    assert "done" in out
    assert "ERBB2" in scope["adata"].var_names
    meta, X, t = scope["meta"], scope["X"], scope["t"]
    order = {tile: i for i, tile in enumerate(meta.column("tile_id").to_pylist())}
    rows = [order[tile] for tile in t.column("tile_id").to_pylist()]
    np.testing.assert_array_equal(scope["X_sql"], X[rows])
    assert X.shape[0] > 150
    hits = scope["hits"].to_pylist()
    assert len(hits) == 10
    assert not {h["slide_id"] for h in hits} & {"C2"}


def test_sql_block(usage_run, workdir):
    import embedstore as es

    (block,) = fenced("sql")
    statements = sql_statements(block)
    assert len(statements) >= 5
    for query in statements:
        rows = es.sql(workdir / "store", query, output="arrow").to_pylist()
        assert rows, f"README SQL returns no row: {query}"
        if "cosine(" in query and "sim" in rows[0]:
            sims = [r["sim"] for r in rows]
            assert sims == sorted(sims, reverse=True)
            assert sims[0] == pytest.approx(1.0, abs=1e-5)  # the query tile itself comes first
        if "erbb2" in rows[0]:
            assert rows[0]["erbb2"] > 100  # ERBB2 is the defining gene of this HER2+ tumour
        if "_tiles(" in query:  # the tile index's functions: best first, filters inside the search
            scores = [r["score"] for r in rows if "score" in r]
            assert scores == sorted(scores, reverse=True)
            assert len(rows) == (5 if "k := 5" in query else 10)
            if "similar_tiles('C2'" in query:
                assert (rows[0]["slide_id"], rows[0]["spot_id"]) == ("C2", "23x26")
            if "exclude_slides := ['C2']" in query and "slide_id" in rows[0]:
                assert "C2" not in {r["slide_id"] for r in rows}


def test_readme_paths_exist():
    """Files and folders the README names in the repository exist."""
    for rel in re.findall(r"`((?:tests|scripts|indexes|embedstore)/[\w./-]+)`", README):
        assert (ROOT / rel.rstrip(".")).exists(), f"README names {rel}, which does not exist"
    for path in re.findall(r"`(\.ci/run|constraints\.txt|BENCHMARKS\.md|pyproject\.toml)`", README):
        assert (ROOT / path).exists()


def test_evaluation_files_are_reproduced_by_the_predict_line(usage_run, workdir):
    """The Evaluation section's `predict` line, with DIR the usage block's eval/, gives predictions_idw.h5ad."""
    import anndata as ad
    import numpy as np

    (line,) = re.findall(r"`(embedstore predict --index DIR/indexes/aligned [^`]+)`", README)
    r = _sh(line.replace("DIR/", "eval/"), workdir)
    _ok(r, line)
    got = ad.read_h5ad(workdir / "idw.h5ad")
    want = ad.read_h5ad(workdir / "eval" / "predictions_idw.h5ad")
    assert list(got.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(got.X, want.X)
