"""Simulated serving: cost models that stand in for the forward pass on a virtual clock (no torch)."""
