"""Name -> object lookup shared by every pluggable part (metrics, corpora, methods).

Users pick components by name in YAML and on the command line, so an unknown name must fail
early and say what was meant, the way lm-eval-harness does: ``Unknown metric 'wnda'; did you
mean 'wanda'? Known: ...``.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; its message lists the close and the known names."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class Registry(Generic[T]):
    """A named table of components, filled by the ``register`` decorator at import time."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        return f"Unknown {self.kind} '{name}'{hint} Known: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
