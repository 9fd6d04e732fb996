"""Declarative index recipes: ``indexes/*.toml`` files parsed into frozen dataclasses.

A recipe names everything needed to rebuild an index from a store: the reference
cohort, the encoder, the gene panel, the aligner settings, the FAISS factory string,
the aggregator and k. The recipes shipped with embedstore (the repository's ``indexes/``,
installed as package data) are searched first, then the
folders in ``EMBEDSTORE_RECIPES`` (``:``-separated), then folders added with
:func:`add_recipe_dir`, as open_clip does for model configs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

from embedstore._params import Choice, Float, Str, Table, check_fields
from embedstore.errors import BadInput

__all__ = ["PanelSpec", "Recipe", "add_recipe_dir", "list_recipes", "load_recipe"]


def _shipped_recipe_dirs() -> list[Path]:
    """The recipes shipped with embedstore: the package data ``embedstore.indexes``.

    The repository's ``indexes/`` folder is that package (``package-dir`` in pyproject.toml),
    so a wheel carries it and an editable install reads the folder itself; a source tree
    used without installing falls back to the folder.
    """
    spec = importlib.util.find_spec("embedstore.indexes")
    if spec is None or not spec.submodule_search_locations:
        return [Path(__file__).resolve().parent.parent / "indexes"]
    return [Path(p) for p in spec.submodule_search_locations]


_RECIPE_DIRS: list[Path] = _shipped_recipe_dirs() + [
    Path(p) for p in os.environ.get("EMBEDSTORE_RECIPES", "").split(os.pathsep) if p
]


_PANEL_FIELDS = {"method": Choice("hvg", "mean", "list")}


@dataclasses.dataclass(frozen=True)
class PanelSpec:
    """How the gene panel is chosen, on the reference only.

    ``"hvg"`` and ``"mean"`` choose ``n_genes`` genes on the reference; ``genes`` are always
    added after them (those not already chosen). ``"list"`` takes ``genes`` alone, in order.
    """

    method: str = "hvg"  # "hvg" | "mean" | "list"
    n_genes: int = 250
    genes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(PanelSpec, dataclasses.asdict(self), "PanelSpec", **_PANEL_FIELDS)
        object.__setattr__(self, "genes", tuple(self.genes))


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """FAISS settings: factory string ("auto" picks by reference size) and search knobs.

    ``nprobe`` None chooses it at build time: the smallest reaching ``target_recall`` at the
    aggregator's k on held-out exemplars (with ``factory = "auto"`` the IVF codec too).
    """

    factory: str = "auto"
    keys: str = "expression"  # "expression" (BLEEP) | "image" (EGN)
    nprobe: int | None = None
    target_recall: float = 0.95


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
    """Aggregator name (registry key), k neighbours and its parameters."""

    name: str = "softmax"
    k: int = 50
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild one exemplar index from a store."""

    name: str
    encoder: str
    cohort: str | None = None
    slides: tuple[str, ...] = ()
    exclude_slides: tuple[str, ...] = ()
    group_by: str = "auto"  # leakage-free unit: "auto" (patient if known, else slide) | "slide_id" | "patient"
    aligner: dict[str, Any] | None = dataclasses.field(default_factory=dict)  # None: no aligner (raw kNN)
    panel: PanelSpec = PanelSpec()
    index: IndexSpec = IndexSpec()
    aggregator: AggregatorSpec = AggregatorSpec()
    seed: int = 0
    source: str = ""  # file the recipe was read from

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, written into the index manifest."""
        return dataclasses.asdict(self)


# Fields whose name means something else in embedstore.PARAMS, or that need more than their type.
_FIELDS: dict[type, dict[str, Any]] = {
    PanelSpec: _PANEL_FIELDS,
    IndexSpec: {"target_recall": Float(gt=0, le=1)},
    AggregatorSpec: {"name": Str()},
}


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Instantiate ``cls`` from a TOML table: unknown keys, types and ranges are checked first."""
    check_fields(cls, table, where, **_FIELDS.get(cls, {}))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


def parse_recipe(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Build a :class:`Recipe` from an already-parsed TOML mapping."""
    data = dict(data)
    nested = {
        "panel": PanelSpec,
        "index": IndexSpec,
        "aggregator": AggregatorSpec,
    }
    for key, cls in nested.items():
        if key in data:
            if Table().problem(data[key]) is not None:
                msg = f"{source}: {key} = {data[key]!r}: must be a table; write it as a [{key}] section"
                raise BadInput(msg)
            table = dict(data[key])
            if cls is AggregatorSpec:
                # every key but name and k is a parameter of the aggregator itself
                params = {k: table.pop(k) for k in list(table) if k not in ("name", "k")}
                table["params"] = params
            data[key] = _build(cls, table, f"{source} [{key}]")
    if data.get("aligner") is False:
        data["aligner"] = None
    for required in ("name", "encoder"):
        if required not in data:
            msg = f'{source}: missing key {required!r}; add `{required} = "..."` at the top of the recipe'
            raise BadInput(msg)
    recipe = _build(Recipe, data, source)
    if recipe.panel.method == "list" and not recipe.panel.genes:
        msg = f'{source} [panel]: method = "list" needs genes = ["GENE1", ...]; list the panel genes'
        raise BadInput(msg)
    return dataclasses.replace(recipe, source=source)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by registered name (see :func:`list_recipes`) or from a TOML file.

    Parameters
    ----------
    name_or_path
        A recipe name such as ``"her2st-builtin"``, or the path of a ``.toml`` file.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        found = _recipe_files().get(str(name_or_path))
        if found is None:
            msg = f"recipe {name_or_path!r}: not found; available: {', '.join(list_recipes()) or 'none'} (or pass a .toml path)"
            raise BadInput(msg)
        path = found
    if not path.is_file():
        msg = f"{path}: recipe file not found; check the path"
        raise BadInput(msg)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        msg = f"{path}: not valid TOML ({e}); fix the syntax"
        raise BadInput(msg) from e
    return parse_recipe(data, source=str(path))


def _recipe_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in _RECIPE_DIRS:
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.toml")):
            files[f.stem] = f  # later folders override earlier ones, as in open_clip
    return files


def list_recipes() -> list[str]:
    """Names of the recipes found in the registered recipe folders."""
    return sorted(_recipe_files())


def add_recipe_dir(path: str | Path) -> None:
    """Register a folder of ``*.toml`` recipes; its names override built-in ones."""
    folder = Path(path)
    if not folder.is_dir():
        msg = f"{folder}: not a folder; pass a folder holding *.toml recipes"
        raise BadInput(msg)
    _RECIPE_DIRS.append(folder)
