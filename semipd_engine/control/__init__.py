"""The SLO-aware partitioner: its latency models and Algorithm 1, and the window loop both drivers feed."""
