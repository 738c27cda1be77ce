"""A saved sweep's folder: where its jobs are (what the analysis reads; the sweep writes it)."""

from __future__ import annotations

from pathlib import Path

# One list per request in a requests.parquet: the sweep's file has them; no statistic of a sweep reads them.
PER_TOKEN = ("token_times_s", "itl_s")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep (a folder with a job.json), in order; goodput probes left out."""
    return sorted(p.parent for p in Path(sweep_dir).rglob("job.json") if "probes" not in p.parts)
