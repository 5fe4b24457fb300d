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
    """A named table of components, filled by the ``register`` decorator at import time.

    ``base``: every registered object must be a subclass of it (``TypeError`` otherwise: lm-eval's
    ``Registry(base_cls=...)``). ``lazy``: name -> a callable that imports the module registering that name, for
    components loaded on first use (lm-eval's ``"module:object"`` placeholders), so a registry low in the import
    order can hold components that live above it."""

    def __init__(self, kind: str, base: type | None = None, lazy: Callable[[], dict[str, Callable[[], None]]] | None = None
                 ) -> None:
        self.kind, self.base, self._lazy = kind, base, lazy
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} '{name}': {obj!r} is not a subclass of {self.base.__name__}")
            self._items[name] = obj
            return obj

        return decorator

    def _pending(self) -> dict[str, Callable[[], None]]:
        return {k: v for k, v in (self._lazy() if self._lazy else {}).items() if k not in self._items}

    def get(self, name: str) -> T:
        if name not in self._items:
            load = self._pending().get(name)
            if load is not None:
                load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        return f"Unknown {self.kind} '{name}'{hint} Known: {', '.join(known)}"

    def names(self) -> list[str]:
        return sorted({*self._items, *self._pending()})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._pending()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
