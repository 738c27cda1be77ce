"""`hydra/sweeper=semipd` (the default): Hydra's basic sweeper, with the offered load as one axis.

`workload.rate` (req/s) and `workload.load` (a fraction of the machine's measured capacity) say the same thing
two ways. A preset that sweeps one of them (the demo sweeps `workload.load`) gives way to a command line that
gives either, as a swept key on the command line always replaces the config's: `python run.py
workload.rate=1,2,4` runs those three rates, not rates x the demo's loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

RATE_AXIS = ("workload.rate", "workload.load")


def one_rate_axis(params: Mapping[str, str], arguments: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The preset's sweep params and the command line's overrides, with the load axis given once."""
    given = {a.lstrip("+~").split("=", 1)[0] for a in arguments}
    params, arguments = dict(params or {}), list(arguments)
    if given & set(RATE_AXIS):
        params = {k: v for k, v in params.items() if k not in RATE_AXIS or k in given}
    return params, arguments


class AxisSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        self.params, arguments = one_rate_axis(self.params, arguments)
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # Each job composed once for the whole sweep: the launcher reuses these (experiments.sweep.launchers).
        from experiments.sweep.compose import composed

        for overrides in batch:
            composed(self.hydra_context.config_loader, self.config, overrides)
