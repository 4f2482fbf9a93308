"""The finite-vs-SDE experiment (docs/experiments.md): a frozen config, its work units run
chunk by chunk with resume, the analysis, and one result. The main job
(``scripts/sde_vs_finite.py``) is a thin CLI over :func:`sde.run_experiment`."""
