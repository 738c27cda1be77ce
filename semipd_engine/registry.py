"""Engine name -> class. Classes load lazily so importing the registry is cheap."""

from __future__ import annotations

import importlib

ENGINES: dict[str, str] = {
    "unified": "baselines.unified:UnifiedEngine",
    "unified_chunked": "baselines.unified:UnifiedEngine",
    "disagg": "baselines.disagg:DisaggEngine",
    "semipd": "semipd_engine.engine:SemiPDEngine",
    "semipd_dynamic": "semipd_engine.dynamic:DynamicSemiPDEngine",
}


def engine_class(name: str):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
