"""Shared helpers of the reproduction scripts: validation of flags, resumable output
folders (one JSON record per finished work unit), atomic JSON, figures, tables."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# Scripts run from a checkout without installation too.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from sde._helpers.devices import unit_key  # noqa: E402,F401  (the scripts' unit keys)
from sde._helpers.validation import (  # noqa: E402,F401  (the one family of input checks)
    check_choice,
    check_each,
    check_int,
    check_number,
)
from shaped_attn import rundir  # noqa: E402


# ------------------------------------------------------------------------ flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_activation(name: str, value: str) -> str:
    """``value`` is a registered attention activation."""
    from shaped_attn import activations  # noqa: PLC0415  (flax only where a script needs it)

    if value not in activations.names():
        raise ValueError(f"{name}={value!r} is not a registered activation: {', '.join(activations.names())}")
    return value


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: Sequence[str] = (),
                     element_types: dict | None = None) -> None:
    """``--field-name`` for every field of the dataclass ``config_cls`` not in ``skip``, with
    default ``None`` (= not given): booleans as ``--x/--no-x``, tuples as space-separated values
    (of the type of the default's first element, or ``element_types[name]``, else str; the flag
    alone gives an empty list)."""
    element_types = element_types or {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=None, help=f"default {f.default!r}")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, tuple):
            kind = element_types.get(f.name) or (type(f.default[0]) if f.default else str)
            parser.add_argument(flag, nargs="*", type=kind, **kw)
        else:
            parser.add_argument(flag, type=type(f.default), **kw)


def config_values(args: argparse.Namespace, config_cls, preset: dict) -> dict:
    """``preset``, then every field flag that was given (lists as tuples without repeats)."""
    values = dict(preset)
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(dict.fromkeys(v)) if isinstance(v, list) else v
    return values


def cli(script: str, prepare: Callable, execute: Callable, argv=None) -> int:
    """Run a study script: ``prepare(argv)`` parses and checks every flag and opens the output
    folder before any work (a ValueError or OSError: one line on stderr, exit code 2); then
    ``execute(*prepared)`` does the work (Ctrl-C: one line, exit code 130; rerun to resume)."""
    try:
        prepared = prepare(argv)
    except (ValueError, OSError) as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        return 2
    try:
        return execute(*prepared)
    except KeyboardInterrupt:
        print(f"{script}: interrupted; rerun the same command to resume from the finished units",
              file=sys.stderr)
        return 130


def check_training_memory(sizes: str, build: Callable[[], Any], loss_fn: Callable, batch: Any, config: Any, *,
                          models: int = 1, eval_fn: Callable | None = None, eval_batch: Any = None,
                          workers: int = 1) -> None:
    """Refuse a training run whose step (or evaluation) does not fit in one device's memory,
    ``workers`` runs at a time: ValueError, one line naming ``sizes``, the memory needed and
    the memory available (docs/experiments.md §6). ``build()`` makes the model; it is only
    traced (``nnx.eval_shape``) and the batches may be ``jax.ShapeDtypeStruct``s, so nothing is
    allocated."""
    from flax import nnx  # noqa: PLC0415
    from shaped_attn import memory, training  # noqa: PLC0415

    for program in training.step_programs(nnx.eval_shape(build), loss_fn, batch, config, models=models,
                                          eval_fn=eval_fn, eval_batch=eval_batch):
        memory.require_program(f"{sizes}: one training step", *program, copies=workers)


def batch_like(batch_size: int, **examples: np.ndarray) -> dict:
    """Shapes of a batch of ``batch_size`` rows of each array of ``examples`` (rows on axis 0)."""
    import jax  # noqa: PLC0415

    return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in examples.items()}


# ------------------------------------------------------------------------ outputs


def open_run(out: str, config: Any, overwrite: bool, outputs: Sequence[str]) -> rundir.RunDir:
    """The output folder bound to ``config`` (a dataclass); refuses a folder holding another
    config unless ``overwrite`` (then the previous chunks and ``outputs`` are deleted)."""
    return rundir.RunDir(out, dataclasses.asdict(config), overwrite=overwrite,
                         outputs=(*outputs, "results.json", "timings.json"))


def nan_to_null(x: Any) -> tuple[Any, int]:
    """``x`` with every non-finite float (e.g. the loss of a diverged run) replaced by None
    (JSON null), and the number replaced."""
    count = 0

    def clean(v):
        nonlocal count
        if isinstance(v, dict):
            return {str(k): clean(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(w) for w in v]
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
            return clean(np.asarray(v).tolist())
        if isinstance(v, float) and not math.isfinite(v):
            count += 1
            return None
        return v

    return clean(x), count


def save_unit(run: rundir.RunDir, name: str, record: Any, seconds: float) -> None:
    """Write one finished work unit as ``chunks/{name}.json`` (atomic; NaN become null)."""
    clean, count = nan_to_null(record)
    run.save_record(name, {"record": clean, "non_finite": count, "seconds": seconds})


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), wall seconds)``."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def load_units(run: rundir.RunDir, names: Sequence[str]) -> tuple[dict, dict, int]:
    """``(records, seconds, non-finite count)`` of finished units, read back from their JSON
    files (so an uninterrupted and a resumed run build results from the same bytes)."""
    records, seconds, count = {}, {}, 0
    for name in names:
        unit = run.load_record(name)
        if unit is not None:
            records[name], seconds[name] = unit["record"], unit["seconds"]
            count += unit["non_finite"]
    return records, seconds, count


def finish(run: rundir.RunDir, payload: dict, non_finite: int, seconds: dict, total_s: float,
           table_md: str | None = None) -> Path:
    """Write ``results.json`` (deterministic: no timings; NaN become null and are counted in
    ``non_finite_values``), ``timings.json`` and, if given, ``table.md``; print where they are."""
    clean, count = nan_to_null(payload)
    clean["non_finite_values"] = non_finite + count
    run.write_json("timings.json", {"units_s": seconds, "total_s": total_s})
    if table_md is not None:
        write_text(run.path / "table.md", table_md + "\n")
    path = run.write_json("results.json", clean)
    print(f"total wall time {total_s:.1f} s; results in {path}")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write."""
    rundir.atomic_write_bytes(Path(path), text.encode())
    return Path(path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def import_in_background(*modules: str, figures: bool = True) -> threading.Thread:
    """Import ``modules`` (and, with ``figures``, :func:`pyplot`) in a daemon thread, so that
    their import overlaps the run's compilation and computation instead of following it (a
    later import in the main thread waits for the thread's)."""
    def load():
        for name in modules:
            importlib.import_module(name)
        if figures:
            pyplot()

    thread = threading.Thread(target=load, name="import_in_background", daemon=True)
    thread.start()
    return thread


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a figure as ``path`` (PNG) and beside it as PDF (:func:`shaped_attn.rundir.save_figure`)
    and close it."""
    path = Path(path)
    rundir.save_figure(fig, path.with_suffix(""))
    return path


def use_compile_cache() -> None:
    """Reuse compiled XLA programs across runs (reruns and resumed runs start faster): the
    persistent cache in ``~/.cache/shaped_attn/jax`` (override with JAX_COMPILATION_CACHE_DIR)."""
    import jax  # noqa: PLC0415

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "shaped_attn" / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def environment() -> dict[str, Any]:
    """Versions and device, recorded in every results.json (:func:`shaped_attn.rundir.environment`)."""
    return rundir.environment()


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and count of the
    finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def nan_band(rows: Sequence[Sequence[Any]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over ``rows`` of the finite values at each index (rows padded to
    ``length``; None and non-finite values ignored; NaN where no row has a value)."""
    a = np.full((len(rows), length), np.nan)
    for i, row in enumerate(rows):
        a[i, : len(row)] = np.asarray(row, dtype=float)
    a[~np.isfinite(a)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # columns without a finite value
        return np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
"""XLA flags of the worker processes of :func:`parallel_map`: one thread each, so that
``workers`` processes share the cores without oversubscription. Every job runs in a worker
with these flags, whatever the number of workers, so results do not depend on it."""


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def parallel_map(fn, jobs: Sequence[Any], workers: int, on_result=None) -> list[Any]:
    """``[fn(*job) for job in jobs]`` in ``workers`` spawned processes (results in job order).

    ``fn`` must be a module-level function of the calling script. ``on_result(job, result)``
    is called in the parent as each job finishes (progress, partial results).
    """
    import concurrent.futures
    import multiprocessing

    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{saved or ''} {SINGLE_THREAD_XLA}".strip()  # inherited
    try:
        ctx = multiprocessing.get_context("spawn")
        results: list[Any] = [None] * len(jobs)
        with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(jobs[i], results[i])
        return results
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
