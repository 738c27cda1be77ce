"""Engines as data: a `Topology` of workers and KV pools per engine, one function each, run by either driver."""
