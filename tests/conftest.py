"""Test-wide settings: float64 everywhere and strict rank promotion (as in diffrax).

Scripts launched as subprocesses share one persistent XLA compilation cache for the session,
so a resumed, restarted or second-process run reuses the executables an earlier run compiled
(cached programs give identical numbers). The cache is set in the environment after jax is
imported here, so it reaches only the child processes, never the test process itself.
"""
import atexit
import os
import shutil
import tempfile

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="shaped_attn_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
