"""Per-GPU efficiency constants derived from public measured kernel latencies (see derive.py)."""
