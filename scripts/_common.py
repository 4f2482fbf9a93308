"""Shared helpers of the reproduction scripts: output folder, atomic JSON, figures, tables."""

from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

# Scripts run from a checkout without installation too.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from shaped_attn import rundir  # noqa: E402


def out_dir(path: str | os.PathLike) -> Path:
    """Create (if needed) and return the output folder."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _nan_to_null(x: Any) -> Any:
    """JSON has no NaN: a non-finite float (e.g. the loss of a diverged run) becomes null."""
    if isinstance(x, dict):
        return {str(k): _nan_to_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_null(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _nan_to_null(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic JSON write (:func:`shaped_attn.rundir.atomic_write_json`); NaN/inf become null."""
    rundir.atomic_write_json(Path(path), _nan_to_null(data))
    return Path(path)


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


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a figure as PNG (atomically) and close it."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, bbox_inches="tight", format="png")
    rundir.atomic_write_bytes(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


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
