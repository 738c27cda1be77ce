"""Each job of a sweep composed once, and jobs that differ only in values composed from one shared config.

Hydra's sweeper (validating a batch), the sweep's own checks (plan.check_jobs) and the launcher (sizing and
starting the jobs) each need every job's config; at ~0.1-0.2 s a composition, an 80-job sweep spent half a minute
composing before its first job started. Two savings:

- each job is composed once per sweep (`_COMPOSED`), whoever asks first;
- most of a composition is the defaults tree and the merge of its config files, which only the config-group
  overrides (`engine=disagg`) change. A sweep's jobs mostly differ in plain values (`workload.rate=8`), which
  Hydra applies after the merge (`ConfigLoaderImpl._apply_overrides_to_config`). So a job is composed from
  its group overrides once (`_BASES`) and its value overrides applied to a copy, with the fields Hydra derives
  from the whole override list (`hydra.overrides.task`, `hydra.job.override_dirname`) set as Hydra sets them.
  Only the plainest overrides take this path (`key.path=value`: no `+`/`~`, no package, no sweep, not under
  `hydra.`, not naming a group); anything else is composed by Hydra whole. tests/experiments/sweep/
  test_launchers.py checks the two paths give equal configs.

Kept apart from the launchers so that the sweeper plugin can use it without importing them.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

_COMPOSED: dict[tuple[str, ...], DictConfig] = {}
_BASES: dict[tuple[str, ...], DictConfig] = {}
_MASTER: list[DictConfig] = []  # the sweep whose jobs _COMPOSED holds (a process runs one sweep at a time)


def composed(loader, config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """One job's config, as `loader.load_sweep_config(config, overrides)` gives it, composed once per sweep."""
    if not _MASTER or _MASTER[0] is not config:
        _COMPOSED.clear()
        _BASES.clear()
        _MASTER[:] = [config]
        _pin_sweep_dir(config)
    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(loader, config, list(overrides))
    return _COMPOSED[key]


def _pin_sweep_dir(config: DictConfig) -> None:
    """Resolve the sweep's directory on the master config before any job copies its resolver cache: a `${now:}`
    first resolved later, in each job, put every job of a sweep whose jobs were composed early (all of a goodput
    sweep's) in a directory of its own, and the sweep's end found none of them."""
    if OmegaConf.select(config, "hydra.sweep", default=None) is not None:
        OmegaConf.select(config, "hydra.sweep.dir")


def _compose(loader, config: DictConfig, overrides: list[str]) -> DictConfig:
    values = _value_overrides(loader, overrides)
    if values is None or not values:
        return loader.load_sweep_config(config, overrides)
    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

    groups = tuple(o for o in overrides if o not in {v.input_line for v in values})
    if groups not in _BASES:
        _BASES[groups] = loader.load_sweep_config(config, list(groups))
    # A copy of the base: pickle's round trip gives what deepcopy gives (both go through the config's state) in a
    # third of the time, which an 80-job sweep pays 80 times before its first job.
    cfg = pickle.loads(pickle.dumps(_BASES[groups], protocol=pickle.HIGHEST_PROTOCOL))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    task = _parsed(overrides)
    cfg.hydra.overrides.task = [o.input_line for o in task]
    dirname = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
    OmegaConf.copy_cache(from_config=config, to_config=cfg)
    return cfg


def _parsed(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides=list(overrides))


def _value_overrides(loader, overrides: Sequence[str]):
    """The overrides Hydra would apply after composing (plain `key.path=value`), or None where the job must be
    composed whole (a hydra override, or a loader that is not Hydra's)."""
    repository = getattr(loader, "repository", None)
    if repository is None or not hasattr(loader, "load_sweep_config"):
        return None
    try:
        parsed = _parsed(overrides)
    except Exception:  # Hydra's own composition says what is wrong with it
        return None
    if any(o.is_hydra_override() for o in parsed):
        return None
    return [o for o in parsed if "." in o.key_or_group and o.package is None and not o.is_sweep_override()
            and not (o.is_add() or o.is_force_add() or o.is_delete()) and not isinstance(o.value(), dict)
            and not repository.group_exists(o.key_or_group.replace(".", "/"))
            and not repository.group_exists(o.key_or_group)]
