"""Load generator for any OpenAI-compatible server (`python -m experiments.loadgen ...`).

client      LoadGenerator, run_loadgen: plan, dispatch on absolute times, record, summarise
workloads   request lengths (and arrival times) from synthetic distributions, datasets and traces
arrivals    the arrival schedule, computed whole before the run
prompts     prompts of an exact token length, as text or token ids
"""

from experiments.loadgen.client import LoadgenError, run_loadgen

__all__ = ["LoadgenError", "run_loadgen"]
