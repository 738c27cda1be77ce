"""One Hydra job (`python run.py`) and the sweep around it.

job          run(cfg, job_dir, overrides, sweep): launch a server, replay the workload, save, track; goodput search
launch       EngineServer: the engine server subprocess of a job
slo          absolute SLOs, or a scale of the measured single-request latency
config       structured-config schemas; conf_store registers them with Hydra
aggregate    the sweep's requests.parquet, summary.csv, table and figures (Hydra callback)
launchers    what each job occupies: `local` runs as many at once as the cores hold, `ray_cluster` sizes Ray tasks
provenance   git commit, packages, machine of a job
tracking     W&B runs (offline by default)
"""
