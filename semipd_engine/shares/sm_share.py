"""SM shares on a CUDA device: semi-PD's (x, y) as the paper means them, a percentage of the GPU's SMs per phase.

Two backends, one arithmetic (`sm_count`):
- `green_context`: each worker runs its kernels on the stream of a CUDA green context holding its share of the
  SMs (torch.cuda.green_contexts). A switch is in-process, at the worker's next iteration boundary (delayed
  switching): the old stream is drained, a context with the new SM count is created and its stream made current.
  The driver splits SMs in groups (8 on compute capability 9.0+, 2 before), so a share is rounded to the nearest
  group, at least one group; 100 % needs no context at all (the device's own, every SM). Caps that add past 100
  overlap, as MPS caps do: each context may use its SMs, and the hardware schedules the overlap.
- `mps`: each worker is an MPS client started with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (what the semi-PD fork does).
  MPS fixes a client's share when its context is created, so a run-time switch replaces the worker: a standby
  started with the new percentage takes over its requests at an iteration boundary
  (`process/engine_client.EngineClient._start_standby`).

Every CUDA call goes through a `GreenContextApi`, so the arithmetic, the rounding and what is created on a switch
are tested without a GPU (tests/semipd_engine/shares/test_sm_share.py); the real calls are in `gpu`-marked tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

MPS_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def sm_granularity(major: int) -> int:
    """SMs per green-context group on a device of compute capability `major`.x."""
    return 8 if major >= 9 else 2


def sm_count(share: int, total_sms: int, granularity: int) -> int:
    """SMs a `share` % cap gets: the nearest whole group, at least one group, at most the groups the device has;
    0 means uncapped (100 %, or a count that would be every group anyway)."""
    groups = total_sms // granularity
    if share >= 100 or groups < 1:
        return 0
    n = min(groups, max(1, round(share / 100 * total_sms / granularity)))
    return 0 if n == groups and groups * granularity == total_sms else n * granularity


class GreenContextApi(Protocol):
    """The CUDA calls a green-context share makes (torch's, or a test's recording fake)."""

    def device(self) -> tuple[int, int]: ...  # (SM count, compute capability major)

    def create(self, num_sms: int) -> Any: ...  # a context holding `num_sms` SMs

    def use(self, ctx: Optional[Any]) -> None: ...  # make its stream current (None: the device's own stream)

    def drain(self) -> None: ...  # wait for the current stream's work (before it is replaced)


class TorchGreenContexts:
    """torch.cuda.green_contexts on the current device."""

    def __init__(self, device_index: int = 0):
        self.index = device_index

    def device(self) -> tuple[int, int]:
        import torch

        props = torch.cuda.get_device_properties(self.index)
        return props.multi_processor_count, props.major

    def create(self, num_sms: int) -> Any:
        from torch.cuda.green_contexts import GreenContext

        return GreenContext.create(num_sms=num_sms, device_id=self.index)

    def use(self, ctx: Optional[Any]) -> None:
        import torch

        torch.cuda.set_stream(ctx.Stream() if ctx is not None else torch.cuda.default_stream(self.index))

    def drain(self) -> None:
        import torch

        torch.cuda.current_stream(self.index).synchronize()


@dataclass
class GreenContextShare:
    """A worker's SM share: the green context it runs on, replaced when the share's SM count changes."""

    api: GreenContextApi
    sms: int = 0  # SMs of the current context (0: the device's own, uncapped)
    ctx: Optional[Any] = None
    created: list[int] = field(default_factory=list)  # SM counts of the contexts made, in order (for /partition)

    def counts(self, share: int) -> int:
        total, major = self.api.device()
        return sm_count(share, total, sm_granularity(major))

    def apply(self, share: int) -> int:
        """Run on `share` % of the SMs from now on; returns the SM count (0: all). Same count: nothing is made."""
        n = self.counts(share)
        if n == self.sms and (n == 0 or self.ctx is not None):
            return n
        self.api.drain()  # the old stream's kernels finish on the old SMs before the new stream takes over
        self.ctx = self.api.create(n) if n else None
        self.api.use(self.ctx)
        self.sms = n
        if n:
            self.created.append(n)
        return n


def green_context_available(device: str) -> Optional[str]:
    """Why green contexts cannot run on `device` (None: they can)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "no CUDA device here"
    from torch.cuda import green_contexts

    if not green_contexts.SUPPORTED:
        return f"this torch ({torch.__version__}) was built without green-context support"
    return None


def mps_pipe_dir() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))


def mps_available(device: str) -> Optional[str]:
    """Why MPS shares cannot run on `device` (None: the MPS control daemon's pipe is there)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "no CUDA device here"
    if not (mps_pipe_dir() / "control").exists():
        return (f"no MPS control daemon (no {mps_pipe_dir() / 'control'}; start one with "
                f"`nvidia-cuda-mps-control -d`)")
    return None


def mps_env(share: int) -> dict[str, str]:
    """The environment an MPS client starts with to be capped at `share` % of the SMs (none when uncapped)."""
    return {} if share >= 100 else {MPS_PERCENTAGE_ENV: str(int(share))}
