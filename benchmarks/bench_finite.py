"""Finite-network Monte Carlo speed: gram and reduced samplers, vmapped real weights, per-sample loop.

Unit: **samples x layers per second** (one layer = attention + MLP sub-block of the shaped
Transformer of docs/model.md §1, float32, m tokens, width n, key width n_k = n).

* ``gram``: ``sde.FiniteSampler(..., sampler="gram")``, one compiled chunk of ``S`` samples.
* ``reduced``: the same with ``sampler="reduced"`` (residual stream on the ~3m features in use,
  exact in law; blocks without LayerNorm), same ``S``; ``ratios.finite_reduced_vs_gram``.
  ``fig1_settings``: both at the main job's Fig. 1 size (m 3, width 200, depth 150).
* ``weights``: ``sde.FiniteSampler(..., sampler="weights")``: real ``shaped_attn`` Block
  modules with theory init built inside ``jax.vmap`` over sample keys, one layer's weights at a
  time in a ``lax.scan``.
* ``loop``: what a researcher writes without the library's sampler: for each sample i a Python
  loop calls ``f(key_i)``, where ``f = jax.jit(key -> gram(Stack(cfg, depth,
  rngs=nnx.Rngs(key))(x0, return_hidden=True).hidden))`` builds the real scanned stack (all
  ``depth`` layers' weights at once) and applies it; the result is copied to NumPy.

Every compiled function is built ahead of time (``lower().compile()``, timed separately) and
timed as the median of repeats after a warm-up call.

``fig1_floor``: the reduced sampler at the Fig. 1 size with 4096 samples in one call (1024 in
quick mode) against the time to draw its normals alone with its keys
(``rng_floor.reduced_floor``): ``ratios.finite_rng_floor_fraction`` = floor / actual.

Also: gram-sampler cost against width (64 .. 4096) with a log-log fitted exponent, achieved
GFLOP/s of the gram sampler against a large-matmul peak measured in the same process, and the
random-number throughput (the gram and weights samplers both spend most of their time there).
"""

from __future__ import annotations

import functools
import importlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from common import GAMMA, RHO0, aot_compile, fit_power, time_calls
from rng_floor import reduced_floor

from sde import FiniteSampler
from sde._helpers.devices import num_shards, sample_keys
from sde._helpers.linalg import gram
from sde._mc.inputs import initial_tokens, sized_config
from shaped_attn.config import shaped_config
from shaped_attn.models import Stack

HEADLINE = dict(width=1024, m=8, depth=64)

LOOP_DESCRIPTION = (
    "Python loop over samples i = 0..S-1 calling one jax.jit-compiled function of the key, "
    "f(fold_in(key, i)), where f(k) = gram(Stack(cfg, depth, rngs=nnx.Rngs(params=k))(x0, "
    "return_hidden=True).hidden): the real shaped_attn Stack (nnx.vmap-initialised, all depth "
    "layers' weights materialised, lax.scan over layers) built and applied per sample; each "
    "result copied to NumPy (np.asarray) inside the loop"
)


def v0(m: int, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray((1 - RHO0) * np.eye(m) + RHO0 * np.ones((m, m)), dtype)


def block_config():
    """``width -> BlockConfig`` of the fig1 shaped Transformer layer."""
    return functools.partial(shaped_config, gamma=GAMMA, tau0=1.0, c_plus=0.0, c_minus=-1.0)


BARTLETT_SCORES = hasattr(importlib.import_module("sde._mc.gram_maps"), "gram_scores")
"""Whether the library's gram sampler draws the scores ``Q K^T`` with a Bartlett factor
(O(m^2) random numbers) instead of drawing ``X W_Q`` and ``X W_K`` (2 m n_k)."""


def gram_layer_flops(m: int, n: int, n_k: int | None = None, bartlett: bool = BARTLETT_SCORES) -> int:
    """Matmul flops of one gram-sampler layer (shaped, one head, no output projection).

    4 Gram matrices ``x x^T / n`` (inputs of attention, MLP-in and MLP-out, and the recorded
    ``V_l``): ``8 m^2 n``; maps ``R @ G`` for value, MLP-in, MLP-out: ``6 m^2 n``; ``A V``:
    ``2 m^2 n``. Scores: with the Bartlett route ``R B G R^T`` (three m x m products,
    ``6 m^3``), otherwise the query and key maps ``4 m^2 n_k`` and ``Q K^T`` ``2 m^2 n_k``.
    The m x m factorisations, softmax and elementwise work are not counted.
    """
    n_k = n if n_k is None else n_k
    scores = 6 * m**3 if bartlett else 6 * m * m * n_k
    return 8 * m * m * n + 6 * m * m * n + 2 * m * m * n + scores


def gram_flops_formula(bartlett: bool = BARTLETT_SCORES) -> str:
    scores = "6 m^3 (scores R B G R^T, Bartlett)" if bartlett else "6 m^2 n_k (query/key maps, Q K^T)"
    return f"8 m^2 n (4 Grams) + 6 m^2 n (value, MLP-in, MLP-out maps R G) + 2 m^2 n (A V) + {scores}"


def gram_layer_normals(m: int, n: int, bartlett: bool = BARTLETT_SCORES) -> int:
    """Standard normals drawn per gram-sampler layer (chi-square draws not counted)."""
    return 3 * m * n + (m * m + m * (m - 1) // 2 if bartlett else 2 * m * n)


def chunk_inputs(runner: FiniteSampler, samples: int, seed: int = 0) -> tuple:
    """``(keys, x0, S)`` of one ``FiniteSampler`` chunk of ``samples`` samples (rounded up to a
    multiple of the device count), placed as ``runner._run`` expects them: the sample axis split
    over the runner's mesh, ``x0`` replicated (no placement without a mesh: one device)."""
    S = -(-samples // num_shards(runner.mesh)) * num_shards(runner.mesh)
    keys, x0 = sample_keys(jax.random.key(seed), np.arange(S)), runner.x0
    if runner.mesh is not None:
        keys = jax.device_put(keys, NamedSharding(runner.mesh, PartitionSpec("samples")))
        x0 = jax.device_put(x0, NamedSharding(runner.mesh, PartitionSpec()))
    return keys, x0, S


def sampler_rate(sampler: str, *, width: int, depth: int, m: int, samples: int, repeats: int,
                 warmup: int = 1, seed: int = 0) -> dict:
    """Samples x layers / s of one compiled ``FiniteSampler`` chunk of ``samples`` samples."""
    runner = FiniteSampler(v0(m), block_config(), width=width, depth=depth, sampler=sampler)
    keys, x0, S = chunk_inputs(runner, samples, seed)
    # FiniteSampler.chunk calls this jitted function; AOT-compile it to time compilation alone.
    compiled, ct = aot_compile(runner._run, keys, x0)
    t = time_calls(lambda: compiled(keys, x0), repeats=repeats, warmup=warmup)
    V = np.asarray(compiled(keys, x0)) if S * (depth + 1) * m * m < 5e7 else None
    out = {"sampler": sampler, "width": width, "depth": depth, "m": m, "samples": S,
           "devices": num_shards(runner.mesh), **ct, **t,
           "samples_layers_per_s": S * depth / t["median_s"],
           "s_per_sample_layer": t["median_s"] / (S * depth)}
    if V is not None:
        out["finite"] = bool(np.all(np.isfinite(V)))
    return out


def loop_rate(*, width: int, depth: int, m: int, samples: int, repeats: int, warmup: int = 1,
              seed: int = 0) -> dict:
    """Samples x layers / s of the per-sample Python loop over the real model (module docstring)."""
    cfg = sized_config(block_config(), width, None, jnp.float32)
    x0 = initial_tokens(v0(m), width)

    def forward(key):
        model = Stack(cfg, depth, rngs=nnx.Rngs(params=key))
        return gram(model(x0, return_hidden=True).hidden)  # (depth + 1, m, m)

    key = jax.random.key(seed)
    compiled, ct = aot_compile(jax.jit(forward), key)

    def loop():
        return np.stack([np.asarray(compiled(jax.random.fold_in(key, i))) for i in range(samples)])

    t = time_calls(loop, repeats=repeats, warmup=warmup)
    return {"sampler": "loop", "width": width, "depth": depth, "m": m, "samples": samples,
            "description": LOOP_DESCRIPTION, **ct, **t,
            "samples_layers_per_s": samples * depth / t["median_s"],
            "s_per_sample_layer": t["median_s"] / (samples * depth)}


def matmul_peak(size: int, repeats: int = 5) -> dict:
    """GFLOP/s of a ``size x size`` float32 ``jnp`` matmul (the achievable peak of this device)."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    compiled, ct = aot_compile(jax.jit(jnp.matmul), a, b)
    t = time_calls(lambda: compiled(a, b), repeats=repeats, warmup=1)
    return {"size": size, "dtype": "float32", **ct, **t,
            "gflops": 2 * size**3 / t["median_s"] / 1e9, "gflops_best": 2 * size**3 / t["min_s"] / 1e9}


def rng_throughput(count: int = 1 << 22, repeats: int = 5) -> dict:
    """Standard normals per second of ``jax.random.normal`` (default PRNG, float32) drawn as the
    samplers draw them (vmapped over sample keys, 8 x 1024 per key), and of NumPy's
    ``default_rng().standard_normal`` (float32, one thread)."""
    rows = max(1, count // (8 * 1024))
    keys = jax.random.split(jax.random.key(0), rows)
    draw = jax.jit(jax.vmap(lambda k: jax.random.normal(k, (8, 1024), jnp.float32)))
    compiled, _ = aot_compile(draw, keys)
    t = time_calls(lambda: compiled(keys), repeats=repeats, warmup=1)
    rng = np.random.default_rng(0)
    total = rows * 8 * 1024
    tn = time_calls(lambda: rng.standard_normal(total, dtype=np.float32), repeats=repeats, warmup=1)
    return {"count": total, "jax_prng_impl": str(jax.config.jax_default_prng_impl),
            "jax_normals_per_s": total / t["median_s"], "numpy_normals_per_s": total / tn["median_s"]}


def width_sweep(widths, *, depth: int, m: int, normals_per_call: float, repeats: int) -> dict:
    """Gram-sampler seconds per sample-layer against width, with a fitted exponent."""
    rows = []
    for n in widths:
        per_sample = depth * gram_layer_normals(m, n)  # random normals of one sample
        S = int(2 ** round(math.log2(max(8, normals_per_call / per_sample))))
        r = sampler_rate("gram", width=n, depth=depth, m=m, samples=S, repeats=repeats)
        r["gflops"] = gram_layer_flops(m, n) * r["samples_layers_per_s"] / 1e9
        r["normals_per_s"] = gram_layer_normals(m, n) * r["samples_layers_per_s"]
        rows.append(r)
    fit = fit_power([r["width"] for r in rows], [r["s_per_sample_layer"] for r in rows])
    large = [r for r in rows if r["width"] >= 512]
    fit_large = fit_power([r["width"] for r in large], [r["s_per_sample_layer"] for r in large])
    return {"sampler": "gram", "m": m, "depth": depth, "rows": rows,
            "fit_all": fit, "fit_width_ge_512": fit_large,
            "note": "cost = seconds per sample x layer; exponent p of cost ~ width^p (log-log least squares)"}


def run(quick: bool = False, log=print, smoke: bool = False) -> dict:
    """All finite-network benchmarks; returns a JSON-able dict with a ``ratios`` entry.

    ``smoke``: tiny sizes that only exercise the code (tests); the numbers mean nothing."""
    n, m, d = HEADLINE["width"], HEADLINE["m"], HEADLINE["depth"]
    if smoke:
        n, d, quick = 64, 4, True
    reps = 2 if quick else 3
    out: dict = {"headline_settings": dict(HEADLINE, gamma=GAMMA, rho0=RHO0, dtype="float32",
                                           block="shaped transformer (attention + MLP), one head, n_k = n")}
    t0 = time.perf_counter()
    out["gram"] = sampler_rate("gram", width=n, depth=d, m=m, samples=32 if quick else 128, repeats=reps)
    log(f"  gram    n={n} d={d}: {out['gram']['samples_layers_per_s']:.4g} samples*layers/s")
    out["reduced"] = sampler_rate("reduced", width=n, depth=d, m=m, samples=32 if quick else 128, repeats=reps)
    log(f"  reduced n={n} d={d}: {out['reduced']['samples_layers_per_s']:.4g} samples*layers/s "
        f"({out['reduced']['samples_layers_per_s'] / out['gram']['samples_layers_per_s']:.2f}x gram)")
    # quick: no warm-up call for the two slow ones (each call is many seconds; the executable is
    # compiled ahead of time, so a first call only adds buffer allocation)
    out["weights"] = sampler_rate("weights", width=n, depth=d, m=m, samples=2 if quick else 4,
                                  repeats=1 if quick else 3, warmup=0 if quick else 1)
    log(f"  weights n={n} d={d}: {out['weights']['samples_layers_per_s']:.4g} samples*layers/s")
    out["loop"] = loop_rate(width=n, depth=d, m=m, samples=2 if quick else 4, repeats=1 if quick else 3,
                            warmup=0 if quick else 1)
    log(f"  loop    n={n} d={d}: {out['loop']['samples_layers_per_s']:.4g} samples*layers/s")
    out["headline_seconds"] = time.perf_counter() - t0
    if quick:
        out["quick_note"] = ("quick mode keeps width 1024, m 8, depth 64 and reduces samples per call "
                             "(gram 32, weights 2, loop 2), repeats (gram 2, weights 1, loop 1) and "
                             "skips the warm-up call of weights and loop (compiled ahead of time)")

    fig1 = dict(width=64, depth=4, m=3) if smoke else dict(width=200, depth=150, m=3)
    S1 = 8 if smoke else 256 if quick else 1024
    out["fig1_settings"] = {s: sampler_rate(s, **fig1, samples=S1, repeats=reps) for s in ("gram", "reduced")}
    f1 = {s: r["samples_layers_per_s"] for s, r in out["fig1_settings"].items()}
    log(f"  fig1 size (m {fig1['m']}, n {fig1['width']}, d {fig1['depth']}, S {S1}): gram {f1['gram']:.4g}, reduced {f1['reduced']:.4g} "
        f"samples*layers/s ({f1['reduced'] / f1['gram']:.2f}x)")

    S_floor = 8 if smoke else 1024 if quick else 4096
    actual = sampler_rate("reduced", **fig1, samples=S_floor, repeats=reps)
    floor = reduced_floor(sized_config(block_config(), fig1["width"], None, jnp.float32), m=fig1["m"],
                          depth=fig1["depth"], samples=actual["samples"], repeats=reps)
    out["fig1_floor"] = {"reduced": actual, "floor": floor, "floor_fraction": floor["median_s"] / actual["median_s"],
                         "with_chi_square_fraction": floor["with_chi_square_median_s"] / actual["median_s"]}
    log(f"  RNG floor, reduced sampler at fig1 size, {actual['samples']} samples: actual {actual['median_s']:.2f} s, "
        f"normals {floor['median_s']:.2f} s (fraction {out['fig1_floor']['floor_fraction']:.2f}; with chi-squares "
        f"{out['fig1_floor']['with_chi_square_fraction']:.2f})")

    out["matmul_peak"] = matmul_peak(256 if smoke else 2048 if quick else 4096)
    out["rng"] = rng_throughput(1 << 16 if smoke else 1 << 22)
    flops = gram_layer_flops(m, n)
    rate = out["gram"]["samples_layers_per_s"]
    gflops = flops * rate / 1e9
    normals = gram_layer_normals(m, n)
    out["gram_gflops"] = {
        "width": n, "m": m, "flops_per_sample_layer": flops, "formula": gram_flops_formula(),
        "bartlett_scores": BARTLETT_SCORES,
        "gflops": gflops, "matmul_peak_gflops": out["matmul_peak"]["gflops"],
        "fraction_of_peak": gflops / out["matmul_peak"]["gflops"],
        "normals_per_sample_layer": normals,
        "normals_per_s": normals * rate,
        "rng_time_fraction_estimate": normals * rate / out["rng"]["jax_normals_per_s"],
        "note": "rng_time_fraction_estimate = normals drawn per second / jax.random.normal throughput "
                "alone: the share of the run that generating the normals would take by itself",
    }
    for k in ("weights", "loop"):  # real weights: 5 n x n matrices per layer (q, k, v, MLP in/out)
        r = out[k]
        r["normals_per_sample_layer"] = 5 * n * n
        r["normals_per_s"] = 5 * n * n * r["samples_layers_per_s"]
        r["rng_time_fraction_estimate"] = r["normals_per_s"] / out["rng"]["jax_normals_per_s"]
    log(f"  weights/loop draw {out['weights']['normals_per_s']:.3g} / {out['loop']['normals_per_s']:.3g} "
        f"normals/s (jax.random.normal alone: {out['rng']['jax_normals_per_s']:.3g})")
    log(f"  gram GFLOP/s {gflops:.3g} of matmul peak {out['matmul_peak']['gflops']:.3g}; "
        f"normals/s {out['gram_gflops']['normals_per_s']:.3g} vs jax.random.normal alone "
        f"{out['rng']['jax_normals_per_s']:.3g}")

    widths = (64, 256, 1024, 4096) if quick else (64, 128, 256, 512, 1024, 2048, 4096)
    if smoke:
        widths = (32, 64)
    out["width_sweep"] = width_sweep(widths, depth=2 if smoke else 16 if quick else 64, m=m,
                                     normals_per_call=1e4 if smoke else 1.5e7 if quick else 6e7,
                                     repeats=reps)
    fits = [out["width_sweep"][k]["exponent"] for k in ("fit_all", "fit_width_ge_512")]
    log("  width sweep: cost ~ n^p, p = " + ", ".join(
        f"{label} {p:.2f}" for label, p in zip(("all widths", "n >= 512"), fits) if p is not None))

    g, w, lp = (out[k]["samples_layers_per_s"] for k in ("gram", "weights", "loop"))
    out["ratios"] = {"finite_gram_vs_weights": g / w, "finite_weights_vs_loop": w / lp,
                     "finite_gram_vs_loop": g / lp,
                     "finite_reduced_vs_gram": out["reduced"]["samples_layers_per_s"] / g,
                     "finite_reduced_vs_gram_fig1": f1["reduced"] / f1["gram"],
                     "finite_rng_floor_fraction": out["fig1_floor"]["floor_fraction"]}
    return out


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(json.dumps(run(args.quick), indent=2))
