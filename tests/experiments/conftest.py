"""Every experiments test keeps its caches (SLO baselines, step-probe calibration) in its own folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEMIPD_CACHE", str(tmp_path_factory.mktemp("cache")))
