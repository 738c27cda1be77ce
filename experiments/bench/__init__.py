"""The benchmarks behind docs/benchmarks.md: `python -m experiments.bench.<engine|loadgen|semipd|disagg|simulator>`.

common   reading a server's /metrics and reporting a result, shared by the benchmarks
"""
