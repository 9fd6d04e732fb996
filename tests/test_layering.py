"""One-way data flow: each module imports only modules listed before it (AST check, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedstore"

# Top-level modules in data-flow order; a module may import only those before it (and itself).
ORDER = [
    "errors", "data",
    "_atomic", "_progress",
    "_optional", "_ray", "_registry", "_schema", "_vectors", "_params", "_checkpoint", "metrics", "smoothing", "probe",
    "recipes",
    "slides", "stain", "spots", "expression",
    "tile_table", "preview", "tiling",
    "encoders",
    "store", "sentences",
    "slide_jobs", "text_embedding", "ray_embed", "context", "embedding",
    "_knn", "_ondisk", "_adamw", "_training", "_aggregator_nets", "_aligner_nets", "aggregate", "loki", "aligner",
    "_text_aligner_nets", "text_aligner",
    "index", "index_folder", "tile_index", "retrieval",
    "build",
    "scoring", "_report_plots", "report",
    "prediction", "cohort_prediction",
    "testing",
    "evaluation",
    "demo",
    "cli",
    "__main__", "__init__",
]  # fmt: skip

# Format modules never pull in compute libraries (STYLE rule 5).
FORBIDDEN = {
    "store": {"torch", "faiss", "anndata", "timm", "open_clip"},
    "spots": {"torch", "faiss", "timm", "open_clip"},
    "slides": {"torch", "faiss", "anndata"},
    "stain": {"torch", "faiss", "anndata"},
    "tiling": {"torch", "faiss", "anndata"},
    "tile_table": {"torch", "faiss", "anndata"},
    "preview": {"torch", "faiss", "anndata"},
    "expression": {"torch", "faiss"},
    "report": {"torch", "faiss"},
}


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(embedstore modules, third-party top-level packages) imported anywhere in the file."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative import inside a subpackage stays inside it
                continue
            if node.module == "embedstore":
                ours.update(a.name for a in node.names if not a.name.startswith("__"))
            elif node.module.startswith("embedstore."):
                ours.add(node.module.split(".")[1])
            else:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("embedstore."):
                    ours.add(a.name.split(".")[1])
                else:
                    theirs.add(a.name.split(".")[0])
    return ours, theirs


def test_every_module_is_placed():
    tops = {_top(p) for p in PACKAGE.rglob("*.py")}
    assert tops <= set(ORDER), f"add {sorted(tops - set(ORDER))} to ORDER in {__file__}"


def test_imports_flow_one_way():
    rank = {m: i for i, m in enumerate(ORDER)}
    bad = []
    for path in PACKAGE.rglob("*.py"):
        me = _top(path)
        ours, _ = _imports(path)
        for dep in ours:
            if dep != me and rank.get(dep, -1) >= rank[me]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {dep}")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_format_modules_stay_light():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        me = _top(path)
        _, theirs = _imports(path)
        hit = theirs & FORBIDDEN.get(me, set())
        if hit:
            bad.append(f"{path.relative_to(PACKAGE)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_sql_on_a_store_loads_no_compute_library(tmp_path):
    """The store finds nearest tiles with FAISS, loaded only when a search runs: plain SQL stays light."""
    import subprocess
    import sys

    code = (
        "import sys, embedstore as es, numpy as np\n"
        "from embedstore.store import open_store\n"
        f"st = open_store({str(tmp_path / 'store')!r}, read_only=False)\n"
        "print(st.sql('SELECT count(*) AS n FROM slides').n[0])\n"
        "print(sorted(m for m in ('faiss', 'torch', 'anndata') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["0", "[]"]
