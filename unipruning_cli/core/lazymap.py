"""A read-only mapping whose values are computed when asked for, never stored (a primitive)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, TypeVar

V = TypeVar("V")


class LazyMap(Mapping[str, V]):
    """``keys`` -> ``value(key)``, computed on every access and not kept: a consumer that works one matrix at a
    time (a cut of |Γ|, the frozen search over onloaded weights) holds one value, not a second copy of all of them.
    A consumer that asks for a key several times (a global cut) pays for each access."""

    def __init__(self, keys: Iterable[str], value: Callable[[str], V]) -> None:
        self._keys = list(keys)
        self._value = value

    def __getitem__(self, key: str) -> V:
        if key not in self._keys:
            raise KeyError(key)
        return self._value(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
