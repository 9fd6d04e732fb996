"""A generic name -> factory registry with metadata, shared by encoders and aggregators."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from embedstore.errors import BadInput


@dataclass(frozen=True)
class Entry:
    """One registered factory and the metadata it was registered with."""

    name: str
    factory: Callable[..., Any]
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps names to factories; registering a name twice is an error.

    Parameters
    ----------
    kind
        What the registry holds ("encoder", "aggregator"); used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers ``factory`` under ``name`` with ``metadata``."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, factory, **metadata)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        """Register ``factory`` under ``name``; raises if the name is taken."""
        if name in self._entries:
            msg = f"{self.kind} {name!r}: already registered; choose another name"
            raise BadInput(msg)
        self._entries[name] = Entry(name, factory, dict(metadata))

    def get(self, name: str) -> Entry:
        """Return the entry for ``name``; an unknown name lists the close matches."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(sorted(self._entries))}"
            msg = f"{self.kind} {name!r}: not registered; {hint}"
            raise BadInput(msg) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the object registered under ``name``."""
        return self.get(name).factory(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def to_dataframe(self):  # -> pandas.DataFrame, imported lazily to keep import cheap
        """One row per entry: the name and its metadata."""
        import pandas as pd

        return pd.DataFrame([{"name": e.name, **e.metadata} for e in self]).set_index("name")
