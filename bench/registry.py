"""Typed name -> object registries with "did you mean ...?" errors (lm-evaluation-harness style).

Sweep files may only name entries of these registries; nothing in a config is ever imported by path.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """`loader`, if given, is called once before the first lookup to import every entry's module (auto-discovery
    at first use, so importing one entry's module never imports all the others)."""

    def __init__(self, kind: str, config_key: str, loader: Callable[[], object] | None = None):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}
        self._loader = loader

    def _load(self) -> None:
        loader, self._loader = self._loader, None  # before calling: entries' modules may look names up
        if loader is not None:
            loader()

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise BenchError(unknown_name_message(self.kind, name, self.names(), self.config_key))
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_name_message(kind: str, name: object, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r} in {where}.{hint} Known: {', '.join(known)}."
