"""One registry type for everything chosen by name in a config (engines, policies, backends, workloads, ...).

Entries are either objects or "module:attribute" strings imported on first use,
so importing a registry never pulls in heavy modules (torch, aiohttp) it may not need.
An unknown name is an error that names the config key and lists the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar, Union

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key  # e.g. ("engine", "engine.name"): used in error messages
        self._entries: dict[str, Union[str, T]] = {}

    def register(self, name: str, target: Union[str, T, None] = None) -> Callable[[T], T] | T:
        """`reg.register("x", obj)`, `reg.register("x", "pkg.mod:Obj")`, or `@reg.register("x")`."""
        if target is not None:
            self._entries[name] = target
            return target

        def deco(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r} ({self.key}); valid names: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target
