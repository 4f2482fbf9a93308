"""Plain NumPy Euler-Maruyama baselines for the covariance SDE (benchmark references only).

Written the way a researcher would write the simulation by hand from the paper: vectorised
over paths, building the ``D x D`` diffusion matrix of the upper-triangular entries
(``D = m (m + 1) / 2``) and taking its square root by ``numpy.linalg.eigh`` at every step.
Self-contained on purpose (it does not call the ``sde`` package); the formulas are the drift
and diffusion of docs/sde.md §2-5 for the full shaped-Transformer block.

``numpy_euler_sde_structured`` is the same loop with the structured O(m^3) noise of
docs/noise.md §1 (one eigh of ``V`` per step), reported for a fair comparison of the algorithm
alone.
"""

from __future__ import annotations

import math

import numpy as np


def _centre(V):
    return (
        V
        - V.mean(axis=-1, keepdims=True)
        - V.mean(axis=-2, keepdims=True)
        + V.mean(axis=(-2, -1), keepdims=True)
    )


def _drift(V, gamma, tau0, c_plus, c_minus):
    m = V.shape[-1]
    F = _centre(V)
    trVF = np.einsum("pij,pij->p", V, F)
    dF = np.einsum("pii->pi", F)
    g = dF - dF.mean(axis=-1, keepdims=True)
    Vg = np.einsum("pij,pj->pi", V, g)
    dV = np.einsum("pii->pi", V)
    outer = dV[:, :, None] * Vg[:, None, :]
    b_att = V * trVF[:, None, None] / m**2 + (outer + outer.transpose(0, 2, 1)) / (2 * m)
    b_att *= 0.0 if math.isinf(tau0) else gamma**2 / tau0**2
    s = np.sqrt(np.maximum(dV[:, :, None] * dV[:, None, :], 0.0))
    rho = np.clip(V / np.where(s > 0, s, 1.0), -1.0, 1.0)
    nu = (c_plus - c_minus) ** 2 / (2 * math.pi) * (np.sqrt(1 - rho**2) - rho * np.arccos(rho))
    return b_att + gamma**2 * nu * s


def _diffusion(V, gamma, tau0):
    m = V.shape[-1]
    a, b = np.triu_indices(m)
    A, B = a[:, None], b[:, None]
    Dd, W = a[None, :], b[None, :]
    lin = V[:, A, Dd] * V[:, B, W] + V[:, A, W] * V[:, B, Dd]
    Sigma = gamma**2 * (4 - gamma**2) * lin
    if not math.isinf(tau0):
        G = V @ _centre(V) @ V / m**2
        acal = (
            V[:, A, Dd] * G[:, B, W]
            + G[:, A, Dd] * V[:, B, W]
            + V[:, A, W] * G[:, B, Dd]
            + G[:, A, W] * V[:, B, Dd]
        )
        Sigma = Sigma + gamma**4 / tau0**2 * acal
    return Sigma


def numpy_euler_sde(V0, gamma, tau0, c_plus, c_minus, T, dt, num_paths, seed, stop_norm=1e4):
    """Euler-Maruyama for the full shaped-Transformer block, generic ``Sigma^{1/2}`` route.

    Returns the final states ``(num_paths, m, m)``; paths whose largest entry exceeds
    ``stop_norm`` or that become non-finite are frozen (as in ``sde.solve``).
    """
    rng = np.random.default_rng(seed)
    V0 = np.asarray(V0)
    dtype = V0.dtype
    m = V0.shape[-1]
    a, b = np.triu_indices(m)
    n_steps = int(round(T / dt))
    V = np.broadcast_to(V0, (num_paths, m, m)).astype(dtype).copy()
    alive = np.ones(num_paths, dtype=bool)
    for _ in range(n_steps):
        Sigma = _diffusion(V, gamma, tau0)
        w, Q = np.linalg.eigh(Sigma)
        R = (Q * np.sqrt(np.maximum(w, 0))[:, None, :]) @ Q.transpose(0, 2, 1)
        xi = rng.standard_normal((num_paths, len(a))).astype(dtype)
        nvec = np.einsum("pij,pj->pi", R, xi) * math.sqrt(dt)
        N = np.zeros_like(V)
        N[:, a, b] = nvec
        N[:, b, a] = nvec
        V_new = V + _drift(V, gamma, tau0, c_plus, c_minus) * dt + N
        ok = np.all(np.isfinite(V_new), axis=(1, 2)) & (np.abs(V_new).max(axis=(1, 2)) <= stop_norm)
        alive &= ok
        V = np.where(alive[:, None, None], V_new, V)
    return V


def numpy_euler_sde_structured(
    V0, gamma, tau0, c_plus, c_minus, T, dt, num_paths, seed, stop_norm=1e4
):
    """Same as :func:`numpy_euler_sde` with the structured O(m^3) noise (eigh of ``V``)."""
    rng = np.random.default_rng(seed)
    V0 = np.asarray(V0)
    dtype = V0.dtype
    m = V0.shape[-1]
    n_steps = int(round(T / dt))
    V = np.broadcast_to(V0, (num_paths, m, m)).astype(dtype).copy()
    alive = np.ones(num_paths, dtype=bool)
    a_lin = math.sqrt(gamma**2 * (4 - gamma**2) / 2)
    c = 0.0 if math.isinf(tau0) else gamma**2 / tau0
    for _ in range(n_steps):
        w, Q = np.linalg.eigh(V)
        L = Q * np.sqrt(np.maximum(w, 0))[:, None, :]
        PL = L - L.mean(axis=1, keepdims=True)
        M = V @ PL / m
        Z1 = rng.standard_normal((num_paths, m, m)).astype(dtype)
        Z2 = rng.standard_normal((num_paths, m, m)).astype(dtype)
        LT = L.transpose(0, 2, 1)
        X = L @ (0.5 * a_lin * (Z1 + Z1.transpose(0, 2, 1)) @ LT + c * Z2 @ M.transpose(0, 2, 1))
        N = (X + X.transpose(0, 2, 1)) * math.sqrt(dt)
        V_new = V + _drift(V, gamma, tau0, c_plus, c_minus) * dt + N
        ok = np.all(np.isfinite(V_new), axis=(1, 2)) & (np.abs(V_new).max(axis=(1, 2)) <= stop_norm)
        alive &= ok
        V = np.where(alive[:, None, None], V_new, V)
    return V
