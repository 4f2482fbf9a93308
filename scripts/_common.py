"""Shared helpers of the reproduction scripts: output folder, atomic JSON, figures, tables."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

# Scripts run from a checkout without installation too.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def out_dir(path: str | os.PathLike) -> Path:
    """Create (if needed) and return the output folder."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)  # JSON has no NaN/inf: "nan", "inf"
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if hasattr(x, "tolist"):  # jax arrays
        return _jsonable(np.asarray(x))
    return x


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON atomically (temporary file in the same folder, then
    ``os.replace``); NaN and inf become the strings "nan", "inf", "-inf"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (same scheme as :func:`write_json`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a figure as PNG (atomically) and close it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def environment() -> dict[str, Any]:
    """Versions and device, recorded in every results.json."""
    import jax
    import flax
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "x64": bool(jax.config.jax_enable_x64),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and count of the
    finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


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
