"""Each job of a sweep composed once.

Hydra's sweeper (validating a batch), the sweep's own checks (plan.check_jobs) and the launcher (sizing and
starting the jobs) each need every job's config; at ~0.1 s a composition, an 80-job sweep spent half a minute
composing before its first job started. Kept apart from the launchers so that the sweeper plugin can use it without
importing them.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

_COMPOSED: dict[tuple[str, ...], DictConfig] = {}
_MASTER: list[DictConfig] = []  # the sweep whose jobs _COMPOSED holds (a process runs one sweep at a time)


def composed(loader, config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """One job's config (`loader.load_sweep_config(config, overrides)`), composed once per sweep."""
    if not _MASTER or _MASTER[0] is not config:
        _COMPOSED.clear()
        _MASTER[:] = [config]
    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = loader.load_sweep_config(config, list(overrides))
    return _COMPOSED[key]
