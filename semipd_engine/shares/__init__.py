"""Compute shares on a real machine: partitions, their placement on cores, CPU-time quotas, the backends."""
