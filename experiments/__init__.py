"""The experiment side of the harness, one subpackage per job.

loadgen    the load generator (`python -m experiments.loadgen ...`)
sweep      one Hydra job (`python run.py ...`) and the sweep around it
analysis   per-request metrics and the paper figures (`python -m experiments.figures SWEEP_DIR`)
bench      the benchmarks behind docs/benchmarks.md (`python -m experiments.bench.engine` ...)
data       shipped traces
"""
