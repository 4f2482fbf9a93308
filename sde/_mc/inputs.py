"""The inputs of a finite-network Monte Carlo: the block's config at a width and tokens with
a given Gram matrix (docs/model.md §3)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from shaped_attn.config import BlockConfig

from .._helpers.validation import check_int

ConfigLike = Union[BlockConfig, Callable[[int], BlockConfig]]


def sized_config(config: ConfigLike, width: int, key_width: Optional[int], dtype) -> BlockConfig:
    """``config`` at ``width`` (features and MLP hidden) and ``key_width`` (n_k per head).

    ``config`` is a :class:`BlockConfig` template (its width is replaced) or a callable
    ``width -> BlockConfig``. ``key_width`` defaults to ``width`` for one head and to
    ``width / H`` for H heads.
    """
    check_int("width", width)
    cfg = config(width) if callable(config) else config
    if not isinstance(cfg, BlockConfig):
        raise ValueError(f"config must be a BlockConfig or width -> BlockConfig, got {cfg!r}")
    heads = cfg.attention.num_heads
    if key_width is None:
        key_width = width if heads == 1 else width // heads
    check_int("key_width", key_width)
    attention = dataclasses.replace(cfg.attention, width=width, head_dim=key_width)
    return dataclasses.replace(
        cfg, attention=attention, mlp_hidden=width, param_dtype=jnp.dtype(dtype).name
    )


def initial_tokens(V0, width: int) -> jax.Array:
    """Deterministic ``X0`` (m x n) with ``X0 X0^T / n = V0`` exactly (docs/model.md §3):
    ``sqrt(n) chol(V0) Q`` with ``Q`` the DCT-II rows ``k = 1..m`` (orthonormal, each orthogonal
    to the all-ones vector, so every token has zero feature mean)."""
    V0 = jnp.asarray(V0)
    m = V0.shape[-1]
    if width < m + 1:
        raise ValueError(f"width={width} must be at least m + 1 = {m + 1} to hold V0 exactly")
    j = np.arange(width)
    k = np.arange(1, m + 1)[:, None]
    q = np.sqrt(2.0 / width) * np.cos(np.pi * (j + 0.5) * k / width)
    root = jnp.linalg.cholesky(V0)
    return math.sqrt(width) * root @ jnp.asarray(q, V0.dtype)
