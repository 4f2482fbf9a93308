"""Shared helpers of the benchmark suites: timing, AOT compilation, machine info, fits.

Timing convention (every suite): the function is compiled ahead of time with
``jax.jit(f).lower(*args).compile()`` (lowering and compilation timed separately), called
``warmup`` times, then ``repeats`` times; we report the median (and min and all) wall time of
the repeats, each ending with ``jax.block_until_ready``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GAMMA = 0.35355  # the fig1 setting 1/sqrt(8) as written in issue 4's target command
RHO0 = 0.2


def block(x):
    import jax

    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of ``repeats`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "repeats": len(times), "warmup": warmup}


def aot_compile(jitted, *args, **kwargs) -> tuple[Any, dict]:
    """``jitted.lower(*args).compile()``; returns the executable and ``{"lower_s", "compile_s"}``.

    ``lower_s`` includes tracing. Use a freshly created ``jax.jit`` object to avoid the trace
    cache when timing repeated compilations.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def fit_power(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares fit of ``log y = a + p log x``: ``{"exponent": p, "prefactor": e^a, "r2"}``."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2:
        return {"exponent": None, "prefactor": None, "r2": None}
    p, a = np.polyfit(lx, ly, 1)
    resid = ly - (a + p * lx)
    ss = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else 1.0
    return {"exponent": float(p), "prefactor": float(math.exp(a)), "r2": r2}


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU/accelerator kind, device count, versions, load at start."""
    import jax
    import jaxlib
    import scipy

    devices = jax.devices()
    info = {
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": sorted({d.device_kind for d in devices}),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "os_cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "hostname": platform.node(),
    }
    try:
        info["load_average_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gb"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def machine_tag(info: dict) -> str:
    """Short file-name tag, e.g. ``cpu-2core-amd-epyc`` or ``gpu-nvidia-h100-80gb-hbm3``."""
    if info["platform"] == "cpu":
        name = f"cpu-{info['cpu_count']}core-{info['cpu_model']}"
    else:
        name = f"{info['platform']}-{info['device_count']}x-{info['device_kind']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"__rusage__": {"maxrss": ru.ru_maxrss, "rc": rc}}), flush=True)
sys.exit(rc)
"""


def run_process(cmd: Sequence[str], *, env: dict | None = None, timeout: float = 900,
                cwd: Path = ROOT) -> tuple[str, dict]:
    """Run ``cmd``; return ``(stdout, {"wall_s", "max_rss_mb"})``.

    ``wall_s`` is the wall time of the whole process (start-up and imports included).
    ``max_rss_mb`` is the peak resident set size of ``cmd``, read with
    ``resource.getrusage(RUSAGE_CHILDREN)`` in a small wrapper process that starts it. The
    wrapper matters: Linux carries the parent's peak RSS over ``fork`` + ``exec`` into the
    child's ``ru_maxrss``, so measuring directly from a large parent (this runner, after the
    other suites) would report the parent's size; the wrapper is a bare Python (~10 MB).
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    wrapped = [sys.executable, "-c", _WRAPPER, *cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(wrapped, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout} s: {' '.join(cmd)}") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.rstrip().splitlines()
    ru = json.loads(lines[-1])["__rusage__"]
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # KiB on Linux, bytes on macOS
    return "\n".join(lines[:-1]) + "\n", {"wall_s": wall, "max_rss_mb": ru["maxrss"] * scale}


def last_json_line(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in:\n{text[-2000:]}")
    return json.loads(lines[-1])
