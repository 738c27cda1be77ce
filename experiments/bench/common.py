"""Helpers shared by the benchmark scripts: read a server's /metrics, report a result."""

from __future__ import annotations

import json
import urllib.request
from typing import Any, Optional


def scrape_metrics(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page: {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def metric_total(samples: dict[str, float], name: str) -> float:
    """Sum of one metric's samples over all its labels."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def emit(result: Any, out: Optional[str]) -> None:
    """Print the result as JSON and, with --out, write it to a file."""
    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
