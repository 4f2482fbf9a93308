"""SDE solver speed: path-steps/s of ``sde.solve`` (structured and generic noise) and NumPy.

    python benchmarks/bench_sde.py [--quick] [--out benchmarks/results/sde.json]

Also run as the ``sde`` suite of ``benchmarks/run.py``. Setting: full shaped-Transformer block,
gamma = 1/sqrt(8) (fig. 1), tau0 = 1, V0 = 0.8 I + 0.2 11^T (rho0 = 0.2), dt = 1e-3, 1000 paths,
float32, m in {2, 4, 8, 16, 32, 64}.

Timing (benchmarks/common.py convention): the chunk program of ``sde.solve`` is compiled ahead
of time (``lower_s``, ``compile_s``), run once to warm up, then timed as the median of
``repeats`` full solves (all chunks) with ``block_until_ready``. The compiled program does
not depend on the number of steps, so the warm-up uses a few steps only.

Routes (``rows``, one per (route, m); ``noise`` names the route):

* ``structured``: the default solver (O(m^3) noise, Cholesky with eigh fallback).
* ``generic``: ``noise="generic"`` (``D x D`` eigh per step, D = m(m+1)/2; O(m^6)). Only for
  m <= 16 in quick mode (m <= 32 in full mode, with fewer paths, reported as ``paths``): at
  m = 64, D = 2080 and one step of 1000 paths would take hours.
* ``numpy_generic``: ``numpy_baselines.numpy_euler_sde``, a vectorised NumPy Euler loop with an
  eigh square root of the D x D diffusion matrix per step (what one writes by hand from the
  paper); m <= 8 (quick) / 16 (full).
* ``numpy_structured``: the same loop with the structured noise (eigh of V per step).

``ratios``: ``sde_structured_vs_generic_m8``, ``sde_structured_vs_numpy_m8`` (against
``numpy_generic``), ``sde_structured_vs_numpy_structured_m8``. ``m64_target``: one timed
solve of 1000 paths x 500 steps at m = 64 (target: under 60 s). ``profile``: factor and chunk
size variants used to choose the defaults.

``rng_floor``: at m = 3 and m = 8, 16384 paths on the Fig. 1 grid (dt = 0.005, 150 steps; 30 in
quick mode at m = 8), the solve's time against the time to draw its normals alone with the
solver's keys (``rng_floor.sde_floor``); ``ratios.sde_rng_floor_fraction_m3`` / ``_m8`` =
floor / solve, and ``sde_bulk_floor_fraction_m3`` / ``_m8`` the same against one bulk
``jax.random.normal`` call (no per-draw keys).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GAMMA, RHO0, aot_compile, machine_info, time_calls  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import importlib  # noqa: E402

import sde  # noqa: E402
import numpy_baselines  # noqa: E402
from sde._helpers.devices import map_chunks, sample_keys  # noqa: E402
from sde._theory.noise import noise_dim  # noqa: E402
from rng_floor import sde_floor  # noqa: E402

SOLVE = importlib.import_module("sde._theory.solve")  # the module (``sde.solve`` is the function)

MS = (2, 4, 8, 16, 32, 64)
PATHS = 1000
DT = 1e-3
TAU0 = 1.0
C_PLUS, C_MINUS = 0.0, -1.0


def _params() -> sde.SDEParams:
    return sde.SDEParams(GAMMA, TAU0, C_PLUS, C_MINUS, block="transformer")


def _v0(m: int, dtype=np.float32) -> np.ndarray:
    return ((1 - RHO0) * np.eye(m) + RHO0 * np.ones((m, m))).astype(dtype)


def sde_rate(
    m: int,
    noise: str,
    steps: int,
    *,
    repeats: int = 3,
    paths: int = PATHS,
    factor: str = "cholesky",
    chunk_size="auto",
    dtype=np.float32,
    warmup_steps: int = 2,
    dt: float = DT,
) -> dict:
    """Path-steps/s of ``sde.solve`` (AOT-compiled chunk program, median of repeats)."""
    plan = SOLVE._plan_solve(
        _v0(m, dtype), _params(), T=steps * dt, dt=dt, num_paths=paths, key=jax.random.key(0),
        save_every=steps, noise=noise, stop_norm=1e4, psd_tol=None, factor=factor,
        brownian_dt=None, deterministic=False,
    )
    C = SOLVE.default_chunk_size(m) if chunk_size == "auto" else chunk_size
    C = min(C, paths)
    compiled, ct = aot_compile(SOLVE._solve_chunk, sample_keys(plan.key, np.arange(C)), plan.V0s[:C],
                               **plan.dynamic, **plan.static)

    def run(n_steps):
        # as sde.solve runs its chunks (sde._theory.integrate.run_paths): path i gets
        # fold_in(key, i), the last chunk is padded with extra paths whose results are dropped
        dyn = dict(plan.dynamic, save_every=jnp.asarray(n_steps, jnp.int32))

        def chunk(idx):
            return compiled(sample_keys(plan.key, idx), plan.V0s[np.minimum(idx, paths - 1)], **dyn)

        return map_chunks(chunk, 0, paths, C)

    jax.block_until_ready(run(min(warmup_steps, steps)))
    last = {}

    def timed():
        last["out"] = run(steps)
        return last["out"]

    t = time_calls(timed, repeats=repeats, warmup=0)
    V, stopped, _ = last["out"]
    return {
        "m": m,
        "noise": noise,
        "factor": factor,
        "dt": dt,
        "dtype": np.dtype(dtype).name,
        "paths": paths,
        "steps": steps,
        "chunk_size": C,
        "lower_s": ct["lower_s"],
        "compile_s": ct["compile_s"],
        "median_s": t["median_s"],
        "times_s": t["times_s"],
        "path_steps_per_s": paths * steps / t["median_s"],
        "us_per_path_step": 1e6 * t["median_s"] / (paths * steps),
        "stopped_fraction": float(np.mean(np.asarray(stopped))),
        "finite": bool(np.all(np.isfinite(np.asarray(V)))),
    }


_NUMPY_CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {bench_dir!r})
import numpy_baselines as nb
fn = getattr(nb, {fn!r})
V0 = ((1 - {rho0}) * np.eye({m}) + {rho0} * np.ones(({m}, {m}))).astype(np.float32)
fn(V0, {gamma}, {tau0}, {cp}, {cm}, {dt}, {dt}, 8, 0)  # warm-up
times = []
for _ in range({repeats}):
    t0 = time.perf_counter()
    V = fn(V0, {gamma}, {tau0}, {cp}, {cm}, {steps} * {dt}, {dt}, {paths}, 0)
    times.append(time.perf_counter() - t0)
print(json.dumps({{"times_s": times, "finite": bool(np.all(np.isfinite(V)))}}))
"""


def numpy_rate(
    m: int, route: str, steps: int, *, paths: int = PATHS, repeats: int = 1, blas_threads: int = 1
) -> dict:
    """Path-steps/s of the NumPy Euler loop (``numpy_generic`` or ``numpy_structured``).

    Runs in a fresh process with ``OPENBLAS_NUM_THREADS`` (and MKL/OMP) = ``blas_threads``:
    for thousands of tiny matrices a single BLAS thread is the fastest setting (on a busy
    2-core machine the default threading was 7x slower at m = 8), so the baseline gets its best
    configuration.
    """
    fn = {"numpy_generic": "numpy_euler_sde", "numpy_structured": "numpy_euler_sde_structured"}[route]
    code = _NUMPY_CHILD.format(
        bench_dir=str(Path(__file__).resolve().parent), fn=fn, m=m, rho0=RHO0, gamma=GAMMA,
        tau0=TAU0, cp=C_PLUS, cm=C_MINUS, dt=DT, steps=steps, paths=paths, repeats=max(1, repeats),
    )
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(blas_threads)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    med = float(np.median(out["times_s"]))
    return {
        "m": m,
        "noise": route,
        "dtype": "float32",
        "paths": paths,
        "steps": steps,
        "blas_threads": blas_threads,
        "median_s": med,
        "times_s": out["times_s"],
        "path_steps_per_s": paths * steps / med,
        "us_per_path_step": 1e6 * med / (paths * steps),
        "finite": out["finite"],
    }


# steps per measurement (each about 1-5 s on 2 CPU cores)
STRUCTURED_STEPS = {2: 400, 4: 300, 8: 200, 16: 100, 32: 40, 64: 10}
GENERIC_STEPS = {2: 40, 4: 20, 8: 5, 16: 1, 32: 1}
GENERIC_PATHS = {32: 20}
NUMPY_GENERIC_STEPS = {2: 20, 4: 10, 8: 5, 16: 1}
NUMPY_STRUCTURED_STEPS = {2: 50, 4: 50, 8: 40, 16: 20, 32: 10, 64: 3}


FLOOR_PATHS = 16384
FLOOR_DT = 0.005  # the Fig. 1 grid: T = 0.75, 150 steps


def floor_row(m: int, steps: int, repeats: int) -> dict:
    """The structured solve of ``FLOOR_PATHS`` paths on the Fig. 1 grid against its RNG floor."""
    row = sde_rate(m, "structured", steps, repeats=repeats, paths=FLOOR_PATHS, dt=FLOOR_DT)
    floor = sde_floor(noise_dim(m, _params()), paths=FLOOR_PATHS, steps=steps, chunk=row["chunk_size"],
                      repeats=repeats)
    bulk_s = floor["normals"] / floor["bulk_normals_per_s"]
    return {"m": m, "paths": FLOOR_PATHS, "steps": steps, "dt": FLOOR_DT, "solve": row, "floor": floor,
            "floor_fraction": floor["median_s"] / row["median_s"],
            "bulk_floor_fraction": bulk_s / row["median_s"]}


def run(quick: bool = False, log=print) -> dict:
    """Run the SDE benchmark; returns the results dict (see the module docstring)."""
    t_start = time.perf_counter()
    repeats = 2 if quick else 3
    rows = []

    def add(row):
        rows.append(row)
        log(
            f"  sde {row['noise']:>16s} m={row['m']:>2d}: {row['path_steps_per_s']:.3g} path-steps/s"
            f" ({row['us_per_path_step']:.1f} us), paths={row['paths']}, steps={row['steps']}"
        )

    for m in MS:
        add(sde_rate(m, "structured", STRUCTURED_STEPS[m], repeats=repeats))
    generic_ms = [m for m in MS if m <= (16 if quick else 32)]
    for m in generic_ms:
        add(sde_rate(m, "generic", GENERIC_STEPS[m], repeats=1 if m >= 16 else repeats,
                     paths=GENERIC_PATHS.get(m, PATHS), warmup_steps=1))
    for m in [m for m in MS if m <= (8 if quick else 16)]:
        add(numpy_rate(m, "numpy_generic", NUMPY_GENERIC_STEPS[m]))
    for m in MS:
        add(numpy_rate(m, "numpy_structured", NUMPY_STRUCTURED_STEPS[m]))

    def rate(route, m):
        return next(r["path_steps_per_s"] for r in rows if r["noise"] == route and r["m"] == m)

    ratios = {
        "sde_structured_vs_generic_m8": rate("structured", 8) / rate("generic", 8),
        "sde_structured_vs_numpy_m8": rate("structured", 8) / rate("numpy_generic", 8),
        "sde_structured_vs_numpy_structured_m8": rate("structured", 8) / rate("numpy_structured", 8),
    }
    floors = {}
    for m in (3, 8):
        floors[f"m{m}"] = f = floor_row(m, 30 if (quick and m == 8) else 150, repeats)
        ratios[f"sde_rng_floor_fraction_m{m}"] = f["floor_fraction"]
        ratios[f"sde_bulk_floor_fraction_m{m}"] = f["bulk_floor_fraction"]
        log(f"  RNG floor m={m}: solve {f['solve']['median_s']:.2f} s, floor {f['floor']['median_s']:.2f} s "
            f"(fraction {f['floor_fraction']:.2f}; bulk-draw fraction {f['bulk_floor_fraction']:.2f})")
    log(f"  ratios: {ratios}")

    # The m = 64 target: 1000 paths x 500 steps (one timed solve after compile + short warm-up).
    # The program is the one compiled for the m = 64 row above (it does not depend on the
    # number of steps), so its compile time is taken from that row.
    r64 = sde_rate(64, "structured", 500, repeats=1)
    row64 = next(r for r in rows if r["noise"] == "structured" and r["m"] == 64)
    compile64 = row64["lower_s"] + row64["compile_s"]
    m64 = {
        "paths": PATHS,
        "steps": 500,
        "run_s": r64["median_s"],
        "compile_s": compile64,
        "total_s": r64["median_s"] + compile64,
        "target_s": 60.0,
        "met": r64["median_s"] < 60.0,
        "stopped_fraction": r64["stopped_fraction"],
        "finite": r64["finite"],
    }
    log(f"  m=64, 1000 paths x 500 steps: run {m64['run_s']:.1f} s (+ compile {m64['compile_s']:.1f} s)")

    # Variants that chose the defaults (cholesky vs eigh factor, chunk size, float64).
    profile = {
        "m8_factor_eigh": sde_rate(8, "structured", STRUCTURED_STEPS[8], factor="eigh", repeats=repeats),
        "m64_factor_eigh": sde_rate(64, "structured", STRUCTURED_STEPS[64], factor="eigh", repeats=1),
        "m64_chunk_1000": sde_rate(64, "structured", STRUCTURED_STEPS[64], chunk_size=1000, repeats=1),
    }
    profile["m8_float64"] = _float64_rate(8, STRUCTURED_STEPS[8], repeats)
    if not quick:
        profile["m64_chunk_64"] = sde_rate(64, "structured", STRUCTURED_STEPS[64], chunk_size=64, repeats=1)
        profile["m64_chunk_256"] = sde_rate(64, "structured", STRUCTURED_STEPS[64], chunk_size=256, repeats=1)
    for k, v in profile.items():
        log(f"  profile {k}: {v['path_steps_per_s']:.3g} path-steps/s ({v['us_per_path_step']:.1f} us)")

    return {
        "setting": {
            "block": "transformer", "gamma": GAMMA, "tau0": TAU0, "rho0": RHO0, "dt": DT,
            "paths": PATHS, "dtype": "float32", "quick": quick,
            "generic_ms": generic_ms,
            "note": "generic noise is O(m^6) per step (eigh of D x D, D = m(m+1)/2); it is capped at "
                    "m <= 16 in quick mode and m <= 32 (20 paths) in full mode. One CPU device: "
                    "splitting paths over forced CPU devices deadlocked in XLA's CPU runtime at "
                    "m = 64 (see sde._helpers.devices.SHARD_ON_CPU), so the two cores are used only through "
                    "XLA's intra-op threads; timings depend on the machine's load (machine.load_average_1m_at_start).",
        },
        "rows": rows,
        "rng_floor": floors,
        "ratios": ratios,
        "m64_target": m64,
        "profile": profile,
        "wall_s": time.perf_counter() - t_start,
    }


def _float64_rate(m: int, steps: int, repeats: int) -> dict:
    """``sde_rate`` in float64, in a fresh process with ``JAX_ENABLE_X64=1`` (switching x64 on
    inside this process after float32 programs were traced is not reliable)."""
    code = (
        "import json, sys; sys.path.insert(0, {d!r}); import numpy as np, bench_sde; "
        "print(json.dumps(bench_sde.sde_rate({m}, 'structured', {steps}, dtype=np.float64, "
        "repeats={repeats})))"
    ).format(d=str(Path(__file__).resolve().parent), m=m, steps=steps, repeats=repeats)
    env = dict(os.environ, JAX_ENABLE_X64="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sde.json"))
    args = ap.parse_args(argv)
    res = run(quick=args.quick)
    res["machine"] = machine_info()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
