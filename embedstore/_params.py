"""Every numeric and enumerated parameter, declared once, checked at the edge.

:data:`PARAMS` maps a parameter name to its constraint (``Int(min=1)``, ``Float(gt=0)``,
``Choice(...)``). The public functions of the stages carry :func:`validated`, which checks
their arguments against it before any work starts; recipe files and index manifests go
through the same specs. A refusal is one :class:`~embedstore.errors.BadInput` line naming the
parameter (and its command-line option), the value and the allowed range, as typer or
pydantic would, but without a multi-line usage box.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from embedstore._schema import META_ENCODER, META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION
from embedstore.errors import BadInput

__all__ = [
    "PARAMS",
    "Bool",
    "Choice",
    "Float",
    "Int",
    "Pattern",
    "Spec",
    "Str",
    "StrList",
    "Table",
    "check",
    "check_fields",
    "validate_manifest",
    "validated",
]


@dataclasses.dataclass(frozen=True)
class Spec(abc.ABC):
    """A constraint on one value; ``optional`` lets None through (the function's default)."""

    optional: bool = False

    @abc.abstractmethod
    def rule(self) -> str:
        """What the value must be, as read in an error line."""

    @abc.abstractmethod
    def ok(self, value: Any) -> bool:
        """True when ``value`` (not None) meets the constraint."""

    def problem(self, value: Any, optional: bool | None = None) -> str | None:
        """None when ``value`` is acceptable, else the rule it breaks."""
        if value is None:
            allowed = self.optional if optional is None else optional
            return None if allowed else self.rule()
        return None if self.ok(value) else self.rule()


def _bounds(lo: Any, lo_strict: bool, hi: Any, hi_strict: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_strict else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_strict else '<='} {hi}")
    return " and ".join(parts)


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool, not a float with an integral value) within [min, max]."""

    min: int | None = None
    max: int | None = None

    def rule(self) -> str:
        """What the value must be."""
        return " ".join(filter(None, ["an integer", _bounds(self.min, False, self.max, False)]))

    def ok(self, value: Any) -> bool:
        """Integral, not bool, within bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclasses.dataclass(frozen=True)
class Float(Spec):
    """A finite real number (ints accepted, bools and strings not) within the given bounds."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def rule(self) -> str:
        """What the value must be."""
        lo, lo_strict = (self.gt, True) if self.gt is not None else (self.ge, False)
        hi, hi_strict = (self.lt, True) if self.lt is not None else (self.le, False)
        return " ".join(filter(None, ["a finite number", _bounds(lo, lo_strict, hi, hi_strict)]))

    def ok(self, value: Any) -> bool:
        """Real, finite, not bool, within bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )


@dataclasses.dataclass(frozen=True, init=False)
class Choice(Spec):
    """One of a fixed set of strings."""

    values: tuple[str, ...] = ()

    def __init__(self, *values: str, optional: bool = False) -> None:
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "optional", optional)

    def rule(self) -> str:
        """What the value must be."""
        return "one of " + ", ".join(self.values)

    def ok(self, value: Any) -> bool:
        """A string among the values."""
        return isinstance(value, str) and value in self.values


@dataclasses.dataclass(frozen=True)
class Pattern(Spec):
    """A string matching a regular expression (whole string), described for the user."""

    regex: str = ""
    description: str = ""

    def rule(self) -> str:
        """What the value must be."""
        return self.description

    def ok(self, value: Any) -> bool:
        """A string matching the regex."""
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    """True or False (not 0/1, not "false")."""

    def rule(self) -> str:
        """What the value must be."""
        return "true or false"

    def ok(self, value: Any) -> bool:
        """A bool."""
        return isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    """A non-empty string."""

    def rule(self) -> str:
        """What the value must be."""
        return "a non-empty string"

    def ok(self, value: Any) -> bool:
        """A non-empty string."""
        return isinstance(value, str) and bool(value.strip())


@dataclasses.dataclass(frozen=True)
class Text(Spec):
    """Any string, empty included (a setting whose empty value means "not recorded")."""

    def rule(self) -> str:
        """What the value must be."""
        return "a string"

    def ok(self, value: Any) -> bool:
        """A string."""
        return isinstance(value, str)


@dataclasses.dataclass(frozen=True)
class StrList(Spec):
    """A list (or tuple) of non-empty strings; a bare string is refused, not split into letters."""

    choices: tuple[str, ...] = ()
    nonempty: bool = False

    def rule(self) -> str:
        """What the value must be."""
        what = f"names among {', '.join(self.choices)}" if self.choices else "strings"
        return f"a {'non-empty ' if self.nonempty else ''}list of {what}"

    def ok(self, value: Any) -> bool:
        """A list/tuple of non-empty strings (among ``choices`` when given)."""
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple) or (self.nonempty and not value):
            return False
        return all(isinstance(v, str) and v.strip() and (not self.choices or v in self.choices) for v in value)


@dataclasses.dataclass(frozen=True)
class Table(Spec):
    """A mapping with string keys (a TOML table, a JSON object)."""

    def rule(self) -> str:
        """What the value must be."""
        return "a table (key = value pairs)"

    def ok(self, value: Any) -> bool:
        """A mapping with str keys."""
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)


# Every parameter with a range or a fixed set of values, wherever it is accepted: the Python
# API, the command line (which calls the API) and recipe files. Optional-ness comes from the
# function's signature (a None default), so `target_mpp=None` means "the encoder's own" in
# embed but is refused by tile.
PARAMS: dict[str, Spec] = {
    "mpp": Float(gt=0),
    "target_mpp": Float(gt=0),
    "size_px": Int(min=1, max=16384),
    "min_tissue": Float(ge=0, le=1),
    "batch_size": Int(min=1),
    "workers": Int(min=0),
    "device": Pattern(regex=r"auto|cpu|mps|cuda(:\d+)?", description="auto, cpu, mps, cuda or cuda:N"),
    "loader": Choice("auto", "threads", "processes"),
    "progress": Bool(),
    "k": Int(min=1),
    "n_genes": Int(min=1),
    "seed": Int(min=0, max=2**32 - 1),
    "nprobe": Int(min=1),
    "efSearch": Int(min=1),
    "factory": Str(),
    "group_by": Choice("auto", "slide_id", "patient"),
    "keys": Choice("expression", "image", "text"),
    "exclude_own": Choice("slide_id", "patient"),
    "tau": Float(gt=0),
    "eps": Float(gt=0),
    "join": Choice("inner", "outer"),
    "plot": Bool(),
    "overwrite": Bool(),
    "allow_missing_positions": Bool(),
}

# Command-line spelling where it is not the parameter name with dashes.
_CLI = {"size_px": "size"}


def _option(name: str) -> str:
    return "--" + _CLI.get(name, name).replace("_", "-")


def _fail(where: str, name: str, value: Any, rule: str) -> BadInput:
    shown = f"{value!r}" if isinstance(value, str) else str(value)
    return BadInput(f"{where}: {name}={shown} ({_option(name)}): must be {rule}")


def check(where: str, *, optional: Mapping[str, bool] | None = None, **values: Any) -> None:
    """Check ``values`` against :data:`PARAMS`; raise one BadInput line on the first bad one.

    Parameters
    ----------
    where
        The function or file the values were given to (first word of the message).
    optional
        Per-parameter override of whether None is allowed.
    **values
        Parameter name -> value; names absent from :data:`PARAMS` are an error of the caller.
    """
    for name, value in values.items():
        rule = PARAMS[name].problem(value, (optional or {}).get(name))
        if rule is not None:
            raise _fail(where, name, value, rule)


def _nullable(param: inspect.Parameter) -> bool:
    # Annotations are strings (from __future__ import annotations): "float | None".
    return param.default is None or "None" in str(param.annotation)


def validated(fn: Callable[..., Any] | None = None, /, **overrides: Spec) -> Any:
    """Decorator: check a public function's arguments against :data:`PARAMS` before it runs.

    Every parameter of the signature named in :data:`PARAMS` (or in ``overrides``) is checked;
    None passes only where the signature allows it (default None or ``| None``).
    """

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        specs = {
            n: (overrides.get(n) or PARAMS[n], _nullable(p))
            for n, p in sig.parameters.items()
            if n in overrides or n in PARAMS
        }
        where = func.__qualname__

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = sig.bind_partial(*args, **kwargs)
            except TypeError:
                return func(*args, **kwargs)  # let Python report the wrong call as it would
            for name, (spec, nullable) in specs.items():
                if name in bound.arguments:
                    value = bound.arguments[name]
                    rule = spec.problem(value, nullable)
                    if rule is not None:
                        raise _fail(where, name, value, rule)
            return func(*args, **kwargs)

        return inner

    return wrap(fn) if fn is not None else wrap


# -------------------------------------------------------------------------- files: recipes, manifests


def _spec_from_annotation(annotation: Any) -> Spec | None:
    """The spec a dataclass field's (string) annotation implies; None when anything goes."""
    text = str(annotation).replace(" ", "")
    optional = "|None" in text or "None|" in text
    base = text.replace("|None", "").replace("None|", "")
    simple: dict[str, Spec] = {
        "int": Int(optional=optional),
        "float": Float(optional=optional),
        "bool": Bool(optional=optional),
        "str": Str(optional=optional),
        "tuple[str,...]": StrList(optional=optional),
        "dict[str,Any]": Table(optional=optional),
    }
    return simple.get(base)


def check_fields(cls: type, table: Mapping[str, Any], where: str, *, ranges: bool = True, **overrides: Spec) -> None:
    """Check a file's table for dataclass ``cls``: unknown keys, types, and ranges from :data:`PARAMS`.

    Parameters
    ----------
    cls
        The dataclass the table fills.
    table
        Key -> value as read from TOML/JSON.
    where
        File and section, e.g. ``"recipe.toml [panel]"``.
    ranges
        Also apply :data:`PARAMS` ranges to fields of the same name (False for settings whose
        names mean something else there).
    **overrides
        Specs of particular fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        msg = f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(fields)}"
        raise BadInput(msg)
    for key, value in table.items():
        spec = overrides.get(key) or (PARAMS.get(key) if ranges else None) or _spec_from_annotation(fields[key].type)
        if spec is not None and spec.problem(value, "None" in str(fields[key].type)) is not None:
            shown = f"{value!r}" if isinstance(value, str) else str(value)
            msg = f"{where}: {key} = {shown}: must be {spec.rule()}"
            raise BadInput(msg)


@dataclasses.dataclass(frozen=True)
class _Key:
    spec: Spec
    required: bool = True


# manifest.json of an exemplar index, schema version SCHEMA_VERSION.
MANIFEST_SCHEMA: dict[str, _Key] = {
    META_SCHEMA_VERSION: _Key(Str()),
    META_KIND: _Key(Str()),
    META_ENCODER: _Key(Table()),
    "factory": _Key(Str()),
    "metric": _Key(Choice("ip", "l2")),
    "keys": _Key(PARAMS["keys"]),
    "aligned": _Key(Bool()),
    "n": _Key(Int(min=1)),
    "dim": _Key(Int(min=1)),
    "input_dim": _Key(Int(min=1)),
    "n_genes": _Key(Int(min=1)),
    "aggregator": _Key(Table()),
    "k": _Key(PARAMS["k"], required=False),
    "group_by": _Key(Choice("slide_id", "patient"), required=False),
    "recipe": _Key(Table(), required=False),
    "text_encoder": _Key(Table(), required=False),
    "smoothing": _Key(Table(), required=False),
    "search": _Key(Table(), required=False),  # settings chosen at build time (embedstore._knn.build_tuned)
    "created_at": _Key(Str(), required=False),
    "embedstore_version": _Key(Str(), required=False),
}


def validate_manifest(raw: Any, file: str | Path, *, kind: str, aggregators: Any) -> dict[str, Any]:
    """Check an index ``manifest.json`` against :data:`MANIFEST_SCHEMA`; return it.

    Parameters
    ----------
    raw
        The parsed JSON.
    file
        Its path, named in every error.
    kind
        The expected ``embedstore.kind``.
    aggregators
        The aggregator registry: the manifest's aggregator must be registered and its
        parameters must be ones its factory takes.

    Raises
    ------
    BadInput
        One line naming the file and the key: missing, unknown, of the wrong type, or a schema
        version other than this embedstore's.
    """
    rebuild = "rebuild the index"
    if not isinstance(raw, dict) or raw.get(META_KIND) != kind:
        msg = f"{file}: not an exemplar index manifest ({META_KIND} is not {kind!r}); {rebuild}"
        raise BadInput(msg)
    if str(raw.get(META_SCHEMA_VERSION)) != SCHEMA_VERSION:
        msg = f"{file}: schema version {raw.get(META_SCHEMA_VERSION)}, this embedstore reads {SCHEMA_VERSION}; {rebuild} or upgrade embedstore"
        raise BadInput(msg)
    unknown = sorted(set(raw) - set(MANIFEST_SCHEMA))
    if unknown:
        msg = f"{file}: unknown key {unknown[0]!r} (schema version {SCHEMA_VERSION} has {', '.join(MANIFEST_SCHEMA)}); {rebuild}"
        raise BadInput(msg)
    for key, entry in MANIFEST_SCHEMA.items():
        if key not in raw:
            if entry.required:
                msg = f"{file}: missing key {key!r}; {rebuild}"
                raise BadInput(msg)
            continue
        if entry.spec.problem(raw[key], False) is not None:
            msg = f"{file}: key {key!r} is {raw[key]!r}, must be {entry.spec.rule()}; {rebuild}"
            raise BadInput(msg)
    _check_aggregator(raw["aggregator"], file, aggregators)
    return raw


def _check_aggregator(spec: Mapping[str, Any], file: str | Path, aggregators: Any) -> None:
    where = f"{file}: key 'aggregator'"
    if set(spec) != {"name", "params"} or not isinstance(spec["name"], str) or not isinstance(spec["params"], dict):
        msg = f"{where} is {dict(spec)!r}, must be {{name: <registered name>, params: {{...}}}}; rebuild the index"
        raise BadInput(msg)
    if spec["name"] not in aggregators:
        msg = f"{where}: {spec['name']!r} is not a registered aggregator ({', '.join(aggregators.names())}); rebuild the index"
        raise BadInput(msg)
    check_aggregator_params(aggregators, spec["name"], spec["params"], f"{where} params")


def check_aggregator_params(aggregators: Any, name: str, params: Mapping[str, Any], where: str) -> None:
    """Refuse parameters the aggregator's factory does not take, and values out of :data:`PARAMS` range."""
    try:
        accepted = inspect.signature(aggregators.get(name).factory).parameters
    except BadInput as e:  # not registered: say where the name came from
        msg = f"{where}: {e}"
        raise BadInput(msg) from None
    for key, value in params.items():
        if key not in accepted:
            msg = (
                f"{where}: unknown parameter {key!r} of aggregator {name!r} (it takes {', '.join(accepted) or 'none'})"
            )
            raise BadInput(msg)
        spec = PARAMS.get(key)
        if spec is not None and spec.problem(value, False) is not None:
            msg = f"{where}: {key} = {value!r}: must be {spec.rule()}"
            raise BadInput(msg)
