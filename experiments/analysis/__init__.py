"""Analysis of saved results.

request_metrics   per-request latency columns, aggregates, SLO attainment, goodput, the client self-check
figures           the paper figures of a sweep (`python -m experiments.figures SWEEP_DIR`)
"""
