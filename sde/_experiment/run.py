"""One call from a config to its result: :func:`run_experiment` (docs/experiments.md)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import jax

from shaped_attn.rundir import RunDir

from .._helpers.processes import agree
from .analysis import analyse
from .config import ExperimentConfig
from .convergence import width_convergence
from .resources import check_resources
from .runner import Runner

OUTPUTS = ("results.npz", "metrics.json", "timings.json", "*.png", "*.pdf")
"""Files of a finished run (deleted with its chunks when ``overwrite`` replaces it)."""


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    """A finished experiment.

    Attributes:
      config: the :class:`ExperimentConfig`.
      metrics: JSON-able agreement statistics (deterministic for a config and seed).
      arrays: named arrays behind the metrics and figures (``results.npz``).
      ensembles: unit -> :class:`Ensemble` (finite networks and SDE paths).
      timings: seconds per unit and in total.
      path: the run directory, or None for an in-memory run.
    """

    config: ExperimentConfig
    metrics: dict
    arrays: dict
    ensembles: dict
    timings: dict
    path: Optional[Path] = None


def open_run_dir(cfg: ExperimentConfig, out, overwrite: bool = False) -> RunDir:
    """The run directory ``out`` bound to ``cfg`` (``out`` may be an open :class:`RunDir`);
    refuses one holding another config unless ``overwrite`` (then its chunks and outputs are
    deleted)."""
    if isinstance(out, RunDir):
        if out.config != RunDir.jsonable(dataclasses.asdict(cfg)):
            raise ValueError(f"out={str(out.path)!r} is bound to another config")
        return out
    return RunDir(out, dataclasses.asdict(cfg), overwrite=overwrite, outputs=OUTPUTS)


def run_experiment(cfg: ExperimentConfig, out=None, *, overwrite: bool = False,
                   progress: bool = False) -> ExperimentResult:
    """Run (or resume) ``cfg``: finite networks and SDE paths, then the analysis.

    In a run over several processes (:func:`sde.join_processes`, docs/experiments.md §4) every
    process calls this with the same arguments, computes its share and returns the same result;
    only process 0 opens ``out`` and writes.

    Arguments:
      cfg: the :class:`ExperimentConfig`.
      out: a run directory (a path or an open :class:`shaped_attn.rundir.RunDir`): config.json, results.npz, metrics.json, timings.json are written
        there (atomically) and finished chunks are kept under ``chunks/``, so rerunning after an
        interruption resumes with the same result. None: in memory.
      overwrite: replace a run directory that holds another config.
      progress: a tqdm bar over chunks.

    Raises:
      ValueError: before any work or output, for ``dtype="float64"`` without
        ``jax_enable_x64``, a run too large for the memory (:func:`check_resources`), or an
        ``out`` that cannot be written, is a file or holds another config.
    """
    if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True) first")
    resources = check_resources(cfg)
    run = agree(lambda: None if out is None else open_run_dir(cfg, out, overwrite))  # process 0's
    start = time.perf_counter()
    runner = Runner(cfg, run, progress=progress, resources=resources)
    ensembles = runner.execute()
    metrics, arrays = analyse(cfg, ensembles)
    if cfg.convergence_widths:
        metrics["width_convergence"] = width_convergence(cfg, ensembles)
    timings = {"units": runner.timings, "total_s": time.perf_counter() - start}
    if run is not None:
        run.write_npz("results.npz", **arrays)
        run.write_json("metrics.json", metrics)
        run.write_json("timings.json", timings)
    return ExperimentResult(cfg, metrics, arrays, ensembles, timings, None if run is None else run.path)
