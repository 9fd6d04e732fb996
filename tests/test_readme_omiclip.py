"""The README's OmiCLIP block, line by line, on the real her2st sections of ``ref/``.

OmiCLIP's weights cannot be here, so each line runs with ``--encoder test-openclip`` (the tiny
random CoCa built by the same code, image and text towers, open_clip's tokenizer), and the
shipped recipe ``her2st-omiclip-loki`` with its encoder set to ``test-openclip`` (every other
line of the file as shipped). The first line, as written, must give the one-line answer that says
how to get the gated weights. The block's ``evaluate`` line cross-validates every method
(minutes on 2 cores): it is ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_readme import _ok, _sh, command_lines, fenced, workdir  # noqa: F401 (fixture)

import embedstore as es

TINY = "--encoder test-openclip"
RECIPE = Path(__file__).resolve().parents[1] / "indexes" / "her2st-omiclip-loki.toml"


def _block() -> list[str]:
    (block,) = [b for b in fenced("bash") if "embedstore embed-text" in b]
    lines = command_lines(block)
    assert all(
        "--encoder omiclip" in ln for ln in lines if ln.split()[1] in ("embed", "embed-text", "search", "evaluate")
    )
    return lines


def _line(start: str) -> str:
    (line,) = [ln for ln in _block() if ln.startswith(start)]
    return line


@pytest.fixture(scope="module")
def clip_run(workdir):  # noqa: F811
    """Every line but evaluate, in order, with the tiny CoCa; returns {line: stdout}."""
    recipe = workdir / "her2st-tiny-loki.toml"
    text = RECIPE.read_text()
    assert 'encoder = "omiclip"' in text
    recipe.write_text(text.replace('encoder = "omiclip"', 'encoder = "test-openclip"'))
    out = {}
    for line in _block():
        if line.startswith("embedstore evaluate"):
            continue
        run = line.replace("--encoder omiclip", TINY).replace("her2st-omiclip-loki", str(recipe))
        out[line] = _ok(_sh(run, workdir), line)
    return out


def test_the_block_as_written_says_how_to_get_the_gated_weights(workdir):  # noqa: F811
    r = _sh(_line("embedstore embed "), workdir)
    if r.returncode == 0:  # OmiCLIP's weights are cached on this machine
        return
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2
    assert len(lines) == 1, r.stderr
    assert "WangGuangyuLab/Loki" in lines[0]


def test_embed_and_embed_text_write_the_image_and_text_tables(clip_run, workdir):  # noqa: F811
    st = es.open_store(workdir / "clip")
    n_tiles = st.sql("SELECT count(*) AS n FROM embeddings_test_openclip", output="arrow").to_pylist()[0]["n"]
    n_text = st.sql("SELECT count(*) AS n FROM embeddings_test_openclip_text", output="arrow").to_pylist()[0]["n"]
    n_sent = st.sql("SELECT count(*) AS n FROM sentences WHERE n_genes > 0", output="arrow").to_pylist()[0]["n"]
    assert n_tiles > 500
    assert n_text == n_sent > 500  # every spot with a sentence, once
    (row,) = st.sql(
        "SELECT sentence, n_genes FROM sentences WHERE slide_id = 'C2' AND n_genes = 50 LIMIT 1", output="arrow"
    ).to_pylist()
    words = row["sentence"].split()
    assert len(words) == 50
    assert not {w for w in words if "-" in w or "." in w}
    assert not {"GAPDH", "ACTB", "B2M"} & set(words)  # housekeeping genes are left out


def test_sql_line_shows_sentences(clip_run):
    out = clip_run[_line("embedstore sql clip")]
    assert "C2" in out
    assert "sentence" in out


def test_search_line_finds_ten_tiles_for_the_markers(clip_run):
    out = clip_run[_line("embedstore search")]
    ranks = [ln.split()[0] for ln in out.strip().splitlines()[1:]]
    assert ranks == [str(i) for i in range(1, 11)]


def test_index_build_line_writes_a_text_keyed_index_with_fine_tuned_heads(clip_run, workdir):  # noqa: F811
    from embedstore.index_folder import load_index

    idx = load_index(workdir / "loki.index")
    assert idx.manifest["keys"] == "text"
    assert idx.manifest["aggregator"]["name"] == "loki"
    assert type(idx.aligner).__name__ == "TextAligner"
    assert "ERBB2" in idx.genes
    assert len(set(idx.exemplars.column("slide_id").to_pylist())) == 3


def test_predict_line_predicts_c2_from_the_other_sections(clip_run, workdir):  # noqa: F811
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(workdir / "C2-loki.h5ad")
    assert a.n_obs > 150
    assert np.isfinite(a[:, "ERBB2"].X).all()


@pytest.mark.slow
def test_evaluate_line_adds_loki_beside_the_other_methods(clip_run, workdir):  # noqa: F811
    line = _line("embedstore evaluate")
    out = _ok(_sh(line.replace("--encoder omiclip", TINY), workdir, timeout=3600), line)
    metrics = json.loads((workdir / "eval-omiclip" / "metrics.json").read_text())
    assert {"loki", "loki-tuned", "ridge", "bleep"} <= set(metrics["methods"])
    assert "loki" in out
