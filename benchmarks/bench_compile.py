"""Compile time against depth: the scanned ``Stack`` and the finite samplers.

Every measurement traces, lowers and compiles a *freshly defined* function (no trace or
compilation cache hit) with ``jax.jit(f).lower(*args).compile()``; we report the median of
``repeats`` (after one discarded warm-up compilation) of ``lower_s`` (tracing + lowering to StableHLO) and ``compile_s`` (XLA).

* ``stack_forward``: ``(state, x) -> Stack(...)(x)`` with the parameters as inputs (the
  model built abstractly with ``nnx.eval_shape``, so nothing is allocated). This is the
  ``compile_d512_over_d8`` ratio.
* ``stack_init_forward``: ``key -> Stack(cfg, depth, rngs=nnx.Rngs(key))(x0)`` (what the
  per-sample loop of :mod:`bench_finite` compiles).
* ``finite_gram`` / ``finite_weights``: one chunk of ``sde.FiniteSampler``.
* ``main_job``: the two programs of the main job at the Fig. 1 target (``numpy_main_job.FIG1_TARGET``),
  compiled cold (fresh ``jax.jit`` objects; the benchmark does not use the persistent compile
  cache): the finite sampler's chunk (the sampler ``"auto"`` picks, 4096 samples, depth 150)
  and the SDE chunk program (default chunk size, one save per step as the main job saves).
"""

from __future__ import annotations

import statistics
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from bench_finite import block_config, chunk_inputs, v0
from common import aot_compile
from numpy_main_job import FIG1_TARGET

from sde import FiniteSampler
from sde._helpers.devices import sample_keys
from sde._mc.inputs import initial_tokens, sized_config
from shaped_attn.config import shaped_config
from shaped_attn.models import Stack


def _median(rows, key):
    return statistics.median(r[key] for r in rows)


def _summary(name, depth, rows):
    return {"what": name, "depth": depth, "repeats": len(rows), "runs": rows,
            "lower_s": _median(rows, "lower_s"), "compile_s": _median(rows, "compile_s"),
            "total_s": _median(rows, "lower_s") + _median(rows, "compile_s")}


def stack_forward(depth: int, *, width: int, m: int, repeats: int) -> dict:
    cfg = sized_config(block_config(), width, None, jnp.float32)
    rows = []
    for _ in range(repeats):
        abstract = nnx.eval_shape(lambda: Stack(cfg, depth, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        x = jax.ShapeDtypeStruct((m, width), jnp.float32)

        def forward(state, x):
            return nnx.merge(graphdef, state)(x, return_hidden=True).hidden

        _, t = aot_compile(jax.jit(forward), state, x)
        rows.append(t)
    return _summary("stack_forward", depth, rows)


def stack_init_forward(depth: int, *, width: int, m: int, repeats: int) -> dict:
    cfg = sized_config(block_config(), width, None, jnp.float32)
    x0 = initial_tokens(v0(m), width)
    rows = []
    for _ in range(repeats):
        def forward(key):
            return Stack(cfg, depth, rngs=nnx.Rngs(params=key))(x0)

        _, t = aot_compile(jax.jit(forward), jax.random.key(0))
        rows.append(t)
    return _summary("stack_init_forward", depth, rows)


def finite_sampler(sampler: str, depth: int, *, width: int, m: int, samples: int, repeats: int) -> dict:
    rows = []
    for _ in range(repeats):
        runner = FiniteSampler(v0(m), block_config(), width=width, depth=depth, sampler=sampler)
        keys, x0, _ = chunk_inputs(runner, samples)
        _, t = aot_compile(runner._run, keys, x0)
        rows.append(t)
    return _summary(f"finite_{sampler}", depth, rows)


def main_job(smoke: bool = False) -> dict:
    """Cold compile time (trace + lower + XLA) of the main job's finite and SDE programs."""
    import importlib

    import numpy as np

    import sde

    solve = importlib.import_module("sde._theory.solve")
    f = dict(FIG1_TARGET, **(dict(width=16, depth=8, samples=64, sde_paths=128, dt=0.05) if smoke else {}))
    m, rho0 = f["m"], f["rho0"]
    V0 = ((1 - rho0) * np.eye(m) + rho0 * np.ones((m, m))).astype(np.float32)
    cfg = partial(shaped_config, gamma=f["gamma"], tau0=f["tau0"], c_plus=f["c_plus"], c_minus=f["c_minus"])
    runner = FiniteSampler(V0, cfg, width=f["width"], depth=f["depth"])
    keys, x0, _ = chunk_inputs(runner, f["samples"])
    _, finite = aot_compile(runner._run, keys, x0)  # a new runner: a fresh jitted function
    T = f["depth"] / f["width"]
    steps = round(T / f["dt"])
    params = sde.SDEParams(f["gamma"], f["tau0"], f["c_plus"], f["c_minus"], block="transformer")
    plan = solve._plan_solve(V0, params, T=T, dt=T / steps, num_paths=f["sde_paths"], key=jax.random.key(0),
                             save_every=1, noise="structured", stop_norm=1e4, psd_tol=None, factor="cholesky",
                             brownian_dt=None, deterministic=False)
    C = min(solve.paths_per_chunk("auto", plan.V0s), f["sde_paths"])
    chunk_fn = jax.jit(solve._solve_chunk.__wrapped__, static_argnames=tuple(plan.static))
    _, sde_t = aot_compile(chunk_fn, sample_keys(plan.key, np.arange(C)), plan.V0s[:C], **plan.dynamic,
                           **plan.static)
    out = {"settings": {"m": m, "width": f["width"], "depth": f["depth"], "samples": f["samples"],
                        "sampler": runner.sampler, "sde_chunk": C, "sde_saves": steps},
           "finite": finite, "sde": sde_t}
    out["total_s"] = sum(t["lower_s"] + t["compile_s"] for t in (finite, sde_t))
    return out


def run(quick: bool = False, log=print, smoke: bool = False) -> dict:
    width, m = (32, 4) if smoke else (256, 8)
    depths = (8, 512) if quick or smoke else (8, 64, 512)
    reps = 1 if smoke else 2 if quick else 3
    out = {"settings": {"width": width, "m": m, "depths": list(depths), "repeats": reps,
                        "block": "shaped transformer layer, float32"}}
    stack_forward(depths[0], width=width, m=m, repeats=1)  # discarded: one-time start-up costs
    for name, fn in (("stack_forward", stack_forward), ("stack_init_forward", stack_init_forward)):
        out[name] = [fn(d, width=width, m=m, repeats=reps) for d in depths]
        log(f"  {name}: " + ", ".join(f"d={r['depth']}: {r['total_s']:.2f} s" for r in out[name]))
    for sampler in ("gram",) if smoke else ("gram", "weights"):
        name = f"finite_{sampler}"
        out[name] = [finite_sampler(sampler, d, width=width, m=m, samples=4, repeats=1 if quick or smoke else 2)
                     for d in (depths[0], depths[-1])]
        log(f"  {name}: " + ", ".join(f"d={r['depth']}: {r['total_s']:.2f} s" for r in out[name]))

    out["main_job"] = main_job(smoke)
    log(f"  main job programs (cold): finite {out['main_job']['finite']['lower_s'] + out['main_job']['finite']['compile_s']:.2f} s, "
        f"SDE {out['main_job']['sde']['lower_s'] + out['main_job']['sde']['compile_s']:.2f} s")

    def ratio(name):
        rows = {r["depth"]: r for r in out[name]}
        return rows[depths[-1]]["total_s"] / rows[depths[0]]["total_s"]

    out["ratios"] = {
        "compile_d512_over_d8": ratio("stack_forward"),
        "compile_init_forward_d512_over_d8": ratio("stack_init_forward"),
        "compile_finite_gram_d512_over_d8": ratio("finite_gram"),
    }
    if "finite_weights" in out:
        out["ratios"]["compile_finite_weights_d512_over_d8"] = ratio("finite_weights")
    out["note"] = "ratios use lower_s + compile_s (trace, lower and XLA compile), medians of repeats"
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
