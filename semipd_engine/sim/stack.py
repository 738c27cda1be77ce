"""The serving software around the GPU: what a stack costs per request and per iteration, and whether it stalls.

The roofline prices kernels; the programs the paper compared also spend CPU time (an HTTP server, a Python
scheduler, input preparation, sampling, detokenisation), and how much, and whether the GPU waits for it, differs
by engine and version far more than a uniform term could say. A `ServingStack` is that cost:

- `request_s` once per request, from its arrival to the engine seeing it (API server, tokenisation, IPC);
- per iteration, `step_s + per_seq_s * sequences + per_token_s * new tokens` of host time, which either stalls
  the GPU (wall = host + device) or, with `overlap` (SGLang's overlap scheduler, vLLM's async output), runs
  beside the previous step (wall = max(host, device));
- `multistep` k: a decode-only iteration pays it once per k steps (vLLM's --num-scheduler-steps), spread evenly
  over the k (the same total; which of the k steps carries it is not modelled).

Host time never scales with a compute share: fewer SMs do not slow the CPU (semipd_engine/sim/simulator.py
applies shares to the device part only). The presets' numbers are derived from public material by
`python -m semipd_engine.sim.calibration.stacks` into calibration/stacks.json, which names every source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from semipd_engine.sim.batch import BatchShape

STACKS_JSON = Path(__file__).resolve().parent / "calibration" / "stacks.json"
FIELDS = ("request_s", "step_s", "per_seq_s", "per_token_s", "overlap", "multistep")


@dataclass(frozen=True, slots=True)
class ServingStack:
    name: str = "ideal"
    request_s: float = 0.0
    step_s: float = 0.0
    per_seq_s: float = 0.0
    per_token_s: float = 0.0
    overlap: bool = False
    multistep: int = 1

    def __post_init__(self):
        for f in ("request_s", "step_s", "per_seq_s", "per_token_s"):
            if getattr(self, f) < 0:
                raise ValueError(f"stack.{f} must be >= 0, got {getattr(self, f)} (stack {self.name!r})")
        if not isinstance(self.multistep, int) or self.multistep < 1:
            raise ValueError(f"stack.multistep must be an integer >= 1, got {self.multistep!r} (stack {self.name!r})")

    def host_time(self, shape: BatchShape) -> float:
        """Host seconds charged to one iteration of this shape."""
        if shape.num_tokens == 0:
            return 0.0
        t = (self.step_s + self.per_seq_s * (shape.prefill_seqs + shape.decode_seqs)
             + self.per_token_s * shape.num_tokens)
        return t / self.multistep if self.multistep > 1 and shape.prefill_seqs == 0 else t

    def decode_host_time(self, batch: int) -> float:
        """`host_time` of a decode-only iteration of `batch` sequences (the fast-forward's constant term)."""
        return self.host_time(BatchShape(decode_seqs=batch, sampled=batch))  # the same arithmetic, to the bit

    def wall(self, host_s: float, device_s: float) -> float:
        """An iteration's wall time from its host and device parts."""
        return (host_s if host_s > device_s else device_s) if self.overlap else host_s + device_s

    @property
    def free(self) -> bool:
        return self.step_s == 0.0 and self.per_seq_s == 0.0 and self.per_token_s == 0.0


IDEAL = ServingStack("ideal")


@functools.lru_cache(maxsize=1)
def _presets() -> dict[str, dict]:
    data = json.loads(STACKS_JSON.read_text())
    return data["stacks"]


def stack_names() -> list[str]:
    return sorted(_presets())


def preset(name: str) -> ServingStack:
    presets = _presets()
    if name not in presets:
        raise ValueError(f"stack={name!r} is not a serving-stack preset; valid: {', '.join(sorted(presets))} "
                         "(or stack=auto: each engine's own)")
    p = presets[name]
    return ServingStack(name, **{f: (int(p[f]) if f == "multistep" else p[f]) for f in FIELDS})


def resolve(stack_cfg, engine_default: str, overhead_s=None) -> ServingStack:
    """The stack a simulated job charges: `stack.name` (`auto`: the engine's own, `engine_default`), then any
    field the config sets; the older `backend.overhead_s`, when set, is the per-iteration constant."""
    name = getattr(stack_cfg, "name", "auto") if stack_cfg is not None else "auto"
    stack = preset(engine_default if name == "auto" else name)
    over = {f: getattr(stack_cfg, f) for f in FIELDS if stack_cfg is not None and getattr(stack_cfg, f) is not None}
    if overhead_s is not None:
        over["step_s"] = overhead_s
    return dataclasses.replace(stack, **over) if over else stack
