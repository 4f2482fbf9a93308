# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/shaped-attn/blob/main/notebooks/02_sde_vs_finite.ipynb)
#
# # 02 · The covariance SDE vs finite shaped Transformers
#
# Noci et al. (arXiv 2306.17759): with shaped attention `I + softmax(Y/tau) - 11^T/m`, a
# residual branch weighted by `gamma`, and depth `d` proportional to width `n`, the token
# covariance `V_l = X_l X_l^T / n` converges (as `n -> inf` with `t = l / n`) to an SDE. We
# compare Monte Carlo samples of finite networks (`sde.simulate_finite`, Gram sampler) with
# paths of the SDE (`sde.solve`), both started at `V0 = (1 - rho0) I + rho0 11^T`.

# %%
# Colab only: install the package without touching Colab's jax/flax. A fork or a mirror is
# installed instead with `%env SHAPED_ATTN_REPO=https://github.com/YOU/shaped-attn` first.
import os
import sys

REPO = os.environ.get("SHAPED_ATTN_REPO", "https://github.com/OWNER/shaped-attn")
if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"git+{REPO}.git"],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "diffrax", "equinox", "optax", "tqdm", "jaxtyping", "lineax", "optimistix"], check=True)

# %%
import os

import jax

jax.config.update("jax_default_matmul_precision", "highest")
print("backend:", jax.default_backend(), "| devices:", jax.devices())
print("device count:", jax.device_count(), "(the library shards over all of them itself)")

QUICK = os.environ.get("SHAPED_ATTN_QUICK") == "1"
SIZES = dict(
    m=3,                                   # tokens
    width=16 if QUICK else 200,            # n
    depth=8 if QUICK else 150,             # d; T = d / n
    samples=128 if QUICK else 4096,        # finite networks
    paths=128 if QUICK else 16384,         # SDE paths
    dt=0.05 if QUICK else 0.01,
    sweep_widths=(8, 16) if QUICK else (25, 50, 100, 200, 400),
)
print("QUICK" if QUICK else "FULL", SIZES)

# %%
import functools
import math

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import sde
from sde import SDEParams
from sde.compare import band, compare_samples
from shaped_attn.config import pre_ln_config, shaped_config, unshaped_config

GAMMA, TAU0, RHO0 = 1 / math.sqrt(8), 1.0, 0.2
m, n, d = SIZES["m"], SIZES["width"], SIZES["depth"]
T = d / n
CHUNK = min(SIZES["samples"], 4096)  # samples per compiled call
V0 = jnp.asarray((1 - RHO0) * np.eye(m) + RHO0 * np.ones((m, m)), jnp.float32)


def rho12(V):
    """Correlation of tokens 1 and 2 from covariances ``[..., m, m]``."""
    V = np.asarray(V)
    return V[..., 0, 1] / np.sqrt(V[..., 0, 0] * V[..., 1, 1])


print(f"n={n}, d={d}, T=d/n={T:.3g}, gamma={GAMMA:.3f}\nV0=\n{np.asarray(V0)}")

# %% [markdown]
# ## Finite networks and the SDE
# `shaped_config(width, gamma)` is the paper's layer (shaped softmax attention, shaped ReLU MLP,
# no LayerNorm). `SDEParams` describes the same block in the limit.

# %%
shaped = functools.partial(shaped_config, gamma=GAMMA, tau0=TAU0)
fin = sde.simulate_finite(V0, shaped, width=n, depth=d, num_samples=SIZES["samples"],
                          key=jax.random.PRNGKey(0), sampler="gram", chunk_size=CHUNK)
params = SDEParams(gamma=GAMMA, tau0=TAU0, c_plus=0.0, c_minus=-1.0, block="transformer",
                   activation="softmax")
steps = round(T / SIZES["dt"])
sol = sde.solve(V0, params, T=T, dt=T / steps, num_paths=SIZES["paths"], key=jax.random.PRNGKey(1))
print("finite V:", fin.V.shape, "stopped", fin.stopped_fraction,
      "| SDE V:", sol.V.shape, "stopped", sol.stopped_fraction)

# %%
keep_f, keep_s = ~np.asarray(fin.stopped), ~np.asarray(sol.stopped)
rho_f, rho_s = rho12(fin.V[keep_f, -1]), rho12(np.asarray(sol.V)[keep_s, -1])
cmp = compare_samples(rho_f, rho_s, num_bootstrap=50 if QUICK else 200)
print(f"rho_12 at the last layer: KS = {cmp.ks:.3f} (p = {cmp.ks_pvalue:.3g}), W1 = {cmp.w1:.4f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
bins = np.linspace(min(rho_f.min(), rho_s.min()), 1, 30)
axes[0].hist(rho_f, bins, density=True, alpha=0.5, label=f"finite n={n}, d={d}")
axes[0].hist(rho_s, bins, density=True, histtype="step", lw=2, label=f"SDE T={T:.3g}")
axes[0].set(xlabel=r"$\rho_{12}$ at the last layer", ylabel="density", title=f"KS {cmp.ks:.3f}, W1 {cmp.w1:.3f}")
axes[0].legend()
t_fin = np.arange(d + 1) / n
bf, bs = band(rho12(fin.V), keep_f), band(rho12(np.asarray(sol.V)), keep_s)
axes[1].plot(t_fin, bf.mean, "o-", ms=3, label="finite (mean)")
axes[1].fill_between(t_fin, bf.lo, bf.hi, alpha=0.2)
axes[1].plot(np.asarray(sol.ts), bs.mean, "--", label="SDE (mean)")
axes[1].fill_between(np.asarray(sol.ts), bs.lo, bs.hi, alpha=0.2)
axes[1].set(xlabel="t = layer / width", ylabel=r"$\rho_{12}$ (band: 5-95 %)")
axes[1].legend()
plt.show()

# %% [markdown]
# ## Ablation: shaped vs unshaped vs Pre-LN
# Without shaping (plain softmax attention, same residual weights) or with Pre-LN, the tokens'
# correlation drifts towards 1 much faster with depth (rank collapse).

# %%
variants = {
    "shaped": shaped,
    "unshaped": functools.partial(unshaped_config, gamma=GAMMA, tau0=TAU0),
    "pre_ln": functools.partial(pre_ln_config, out_proj=False, tau0=TAU0),
}
fig, ax = plt.subplots(figsize=(6, 4))
for i, (name, cfg) in enumerate(variants.items()):
    res = fin if name == "shaped" else sde.simulate_finite(
        V0, cfg, width=n, depth=d, num_samples=SIZES["samples"], key=jax.random.PRNGKey(2 + i),
        chunk_size=CHUNK)
    b = band(rho12(res.V), ~np.asarray(res.stopped))
    ax.plot(t_fin, b.mean, "o-", ms=3, label=name)
    print(f"{name:9s} mean rho_12 at the last layer: {b.mean[-1]:.3f}")
ax.set(xlabel="t = layer / width", ylabel=r"mean $\rho_{12}$")
ax.legend()
plt.show()

# %% [markdown]
# ## Width sweep at fixed T = d / n
# The finite-network law should approach the SDE's as the width grows (KS and W1 shrink).

# %%
rows = []
for w in SIZES["sweep_widths"]:
    dw = max(1, round(T * w))
    r = fin if (w, dw) == (n, d) else sde.simulate_finite(
        V0, shaped, width=w, depth=dw, num_samples=SIZES["samples"], key=jax.random.PRNGKey(10 + w),
        chunk_size=CHUNK)
    c = compare_samples(rho12(r.V[~np.asarray(r.stopped), -1]), rho_s, num_bootstrap=20)
    rows.append((w, dw, c.ks, c.w1))
    print(f"width {w:4d} depth {dw:4d}: KS {c.ks:.3f}, W1 {c.w1:.4f}")
rows = np.array(rows)
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(rows[:, 0], rows[:, 2], "o-", label="KS")
ax.loglog(rows[:, 0], rows[:, 3], "s-", label="W1")
ax.set(xlabel="width n", ylabel="distance to the SDE")
ax.legend()
plt.show()
