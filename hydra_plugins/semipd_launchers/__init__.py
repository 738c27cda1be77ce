"""This project's Hydra launchers (`hydra/launcher=local`, `ray_cluster`): see experiments/sweep/launchers.py.

Hydra only instantiates launcher classes from the `hydra_plugins` namespace, and imports every module in it at
start-up, so these modules stay thin and import nothing heavy (Ray included) until a sweep launches.
"""
