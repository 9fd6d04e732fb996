"""embedstore as users install it: a wheel, in a fresh virtual environment, outside the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding the built wheel; the heavy dependencies come from this environment (a .pth)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy of the sources: setuptools keeps a build/ folder in the project,
    # whose stale files (a module since renamed) would otherwise ship in the wheel.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("embedstore", "indexes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("embedstore-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    # Only the dependencies: a path added by a .pth is not a site folder, so the editable
    # install of this environment (its own .pth finder) is not seen from the fresh venv.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return wheel, python, tmp


def test_the_wheel_ships_every_recipe(installed):
    wheel, _, _ = installed
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("embedstore/indexes/")}
    assert names == {p.name for p in (REPO / "indexes").glob("*.toml")}


def test_installed_package_lists_and_loads_its_recipes(installed):
    _, python, tmp = installed
    script = (
        "import json, embedstore, embedstore.recipes as r; "
        "print(embedstore.__file__); print(json.dumps(r.list_recipes())); print(r.load_recipe('her2st-builtin').encoder)"
    )
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, check=False, cwd=tmp)
    assert result.returncode == 0, result.stderr
    where, names, encoder = result.stdout.splitlines()
    assert not Path(where).is_relative_to(REPO)  # the installed copy, not the repository
    assert json.loads(names) == sorted(p.stem for p in (REPO / "indexes").glob("*.toml"))
    assert encoder == "builtin"
    cli = subprocess.run(
        [python, "-m", "embedstore", "index", "list"], capture_output=True, text=True, check=False, cwd=tmp
    )
    assert cli.returncode == 0, cli.stderr
    assert "her2st-builtin" in cli.stdout.split()


def test_the_wheel_holds_exactly_the_package_sources(installed):
    """Every module of the source tree ships, and nothing else (no stale copy of a renamed module)."""
    wheel, _, _ = installed
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("embedstore/") and n.endswith(".py")}
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "embedstore").rglob("*.py")}
    sources |= {"embedstore/indexes/" + p.name for p in (REPO / "indexes").glob("*.py")}
    assert shipped == sources
    assert "embedstore/templates/report.html.j2" in zipfile.ZipFile(wheel).namelist()
