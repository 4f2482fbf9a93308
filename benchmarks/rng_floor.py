"""Random-number floors: the time to draw the normals a part needs, and nothing else.

The floor of a part is the wall time of a jitted program that draws the same number of
standard normals, in the same dtype and from the same keys, as the part does, and only adds
them up (so that XLA cannot drop them). ``floor time / actual time`` is the fraction of its
random-number floor a part runs at (1 = it costs no more than its random numbers).

* SDE (:func:`sde_floor`): ``sde.solve``'s key scheme (docs/noise.md §3): path ``i`` has the key
  ``fold_in(key, i)``, grid step ``j`` draws ``normal(fold_in(key_i, j), (noise_dim,))``
  (``GridBrownianPath``), all paths of a chunk vmapped inside a ``fori_loop`` over steps, the
  chunks run as the solver runs them (``map_chunks``). The floor is the faster of the solver's
  chunk size and all paths in one call.
* Finite reduced sampler (:func:`reduced_floor`): sample ``i`` has ``fold_in(key, i)``, layer
  keys ``split(key_i, depth)`` in a ``lax.scan``, and each layer draws one
  ``normal(split(layer_key)[0], (count,))`` with the count of the sampler's
  ``LayerDraws`` record (docs/samplers.md §4). Its chi-square draws are timed on top as a
  second figure (``with_chi_square``).
* ``bulk_normals_per_s``: one ``jax.random.normal`` call of the same count from one key (no
  per-draw keys): the rate the issue quoted (about 85 M/s on an idle 2-core CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from common import aot_compile, time_calls

from sde._helpers.devices import map_chunks, sample_keys


def _sde_draw(D: int, dtype):
    def draw(keys, steps):
        def body(j, acc):
            return acc + jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), (D,), dtype))(keys)

        return jax.lax.fori_loop(0, steps, body, jnp.zeros((keys.shape[0], D), dtype))

    return jax.jit(draw)


def sde_floor(D: int, *, paths: int, steps: int, chunk: int, dtype=np.float32, repeats: int = 3,
              seed: int = 0) -> dict:
    """Seconds to draw ``paths x steps x D`` normals with the solver's key scheme (see above)."""
    key = jax.random.key(seed)
    rows = {}
    for C in sorted({min(chunk, paths), paths}):
        compiled, _ = aot_compile(_sde_draw(D, dtype), sample_keys(key, np.arange(C)), jnp.int32(steps))

        def run(C=C, compiled=compiled):
            return map_chunks(lambda idx: compiled(sample_keys(key, idx), jnp.int32(steps)), 0, paths, C)

        rows[C] = time_calls(run, repeats=repeats)["median_s"]
    best = min(rows, key=rows.get)
    count = paths * steps * D
    return {"normals": count, "per_path_step": D, "dtype": np.dtype(dtype).name,
            "median_s_by_chunk": {str(c): t for c, t in rows.items()}, "chunk": best,
            "median_s": rows[best], "normals_per_s": count / rows[best],
            "bulk_normals_per_s": bulk_rate(count, dtype, repeats)}


def bulk_rate(count: int, dtype=np.float32, repeats: int = 3) -> float:
    """Normals per second of one ``jax.random.normal`` call of ``count`` (capped at 2^24) from one key."""
    n = min(count, 1 << 24)
    draw = jax.jit(lambda k: jnp.sum(jax.random.normal(k, (n,), dtype)))
    compiled, _ = aot_compile(draw, jax.random.key(0))
    return n / time_calls(lambda: compiled(jax.random.key(0)), repeats=repeats)["median_s"]


def reduced_layer_draws(cfg, m: int) -> tuple[int, np.ndarray]:
    """``(normals, chi-square dfs)`` one reduced-sampler layer draws for ``m`` tokens (the
    sampler's own ``LayerDraws`` record)."""
    from sde._helpers.wishart import LayerDraws
    from sde._mc.reduced import _reduced_maps, reduced_layout

    record = LayerDraws(jnp.dtype(cfg.param_dtype))
    _reduced_maps(cfg, reduced_layout(cfg, m), m, record)
    return record.count, np.asarray(record.dfs, np.float64)


def reduced_floor(cfg, *, m: int, depth: int, samples: int, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to draw the reduced sampler's normals (and, as a second figure, its normals and
    chi-squares) for ``samples`` samples of ``depth`` layers in one call, keyed as the sampler."""
    from sde._helpers.wishart import chi_square

    count, dfs = reduced_layer_draws(cfg, m)
    dtype = jnp.dtype(cfg.param_dtype)

    def program(with_chi: bool):
        def one(key):
            def layer(acc, layer_key):
                k_normal, k_chi = jax.random.split(layer_key)
                acc = acc + jnp.sum(jax.random.normal(k_normal, (count,), dtype))
                if with_chi and len(dfs):
                    acc = acc + jnp.sum(chi_square(k_chi, jnp.asarray(dfs, dtype), dfs.shape, dtype))
                return acc, None

            return jax.lax.scan(layer, jnp.zeros((), dtype), jax.random.split(key, depth))[0]

        return jax.jit(jax.vmap(one))

    keys = sample_keys(jax.random.key(seed), np.arange(samples))
    out = {"normals": samples * depth * count, "normals_per_sample_layer": count,
           "chi_squares_per_sample_layer": len(dfs), "dtype": dtype.name}
    for name, with_chi in (("median_s", False), ("with_chi_square_median_s", True)):
        compiled, _ = aot_compile(program(with_chi), keys)
        out[name] = time_calls(lambda: compiled(keys), repeats=repeats)["median_s"]
    out["normals_per_s"] = out["normals"] / out["median_s"]
    out["bulk_normals_per_s"] = bulk_rate(samples * depth * count, dtype, repeats)
    return out

