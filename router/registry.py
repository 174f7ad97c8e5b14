"""One registry shape for every pluggable kind (backends, encoders, verifiers, templates).

Entries are ``"module:object"`` strings imported only when chosen, so registering a heavy engine
costs nothing until it is used; an unknown name fails with the list of valid ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator


class Registry:
    """Names to lazily imported objects: ``registry.get("llamacpp")`` imports and returns it."""

    def __init__(self, kind: str, entries: dict[str, str], missing_hint: str = ""):
        self.kind = kind  # what the names are, for error messages ("backend", "encoder", ...)
        self.entries = dict(entries)
        self.missing_hint = missing_hint  # appended when the entry's module cannot be imported

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else a ValueError listing the valid names."""
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return name

    def get(self, name: str) -> Any:
        """Import and return the object registered as ``name``.

        An ImportError of the entry's module (a missing optional dependency) is re-raised as an
        ImportError that names the entry and the hint.
        """
        module, _, obj = self.entries[self.check(name)].partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            hint = f"; {self.missing_hint}" if self.missing_hint else ""
            raise ImportError(f"{self.kind} {name!r} needs an optional dependency that is not installed "
                              f"({e}){hint}") from e
        return getattr(mod, obj)
