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
# compare Monte Carlo samples of finite networks (exact samplers) with paths of the SDE
# (diffrax), both started at `V0 = (1 - rho0) I + rho0 11^T`. The theory is in `docs/`.

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
    variants=("unshaped",) if QUICK else ("unshaped", "pre_ln"),
    sweep_widths=(8,) if QUICK else (25, 50, 100, 200, 400),
)
print("QUICK" if QUICK else "FULL", SIZES)

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import sde
from shaped_attn.config import shaped_config, unshaped_config

GAMMA, TAU0, RHO0 = 1 / math.sqrt(8), 1.0, 0.2
n, d = SIZES["width"], SIZES["depth"]

# %% [markdown]
# ## The SDE of a finite block
# `shaped_config(width, gamma)` is the paper's layer (shaped softmax attention, shaped ReLU MLP,
# no LayerNorm). `SDEParams.from_block` gives its SDE, and says why for blocks that have none.

# %%
print(sde.SDEParams.from_block(shaped_config(n, GAMMA, tau0=TAU0)))
try:
    sde.SDEParams.from_block(unshaped_config(n, GAMMA))
except ValueError as err:
    print("unshaped:", err)

# %% [markdown]
# ## The experiment in a few lines
# `ExperimentConfig` holds everything a run depends on; `run_experiment` draws the finite
# networks (exact samplers), solves the SDE (diffrax Euler) and compares them. Pass `out=` to
# keep chunks on disk and resume after an interruption (what `scripts/sde_vs_finite.py` does).

# %%
cfg = sde.ExperimentConfig(m=SIZES["m"], rho0=RHO0, width=n, depth=d, gamma=GAMMA, tau0=TAU0,
                           samples=SIZES["samples"], sde_paths=SIZES["paths"], dt=SIZES["dt"],
                           variants=SIZES["variants"], sweep_widths=SIZES["sweep_widths"])
result = sde.run_experiment(cfg, progress=True)
metrics, arrays = result.metrics, result.arrays
print(f"rho_12 at T = {cfg.T:.3g}: KS = {metrics['ks_rho']:.3f} (p = {metrics['ks_pvalue_rho']:.3g}), "
      f"W1 = {metrics['w1_rho']:.4f}; stopped: {metrics['stopped_fraction']}")

# %% [markdown]
# Moments with standard errors from both Monte Carlo sides (`sde.compare_moments`): the
# differences are in units of their standard error.

# %%
finite = result.ensembles[("finite", "shaped", GAMMA, n, d, TAU0)]
paths = result.ensembles[("sde", GAMMA, cfg.T, TAU0)]
for name, stat in {"rho_12": lambda V: sde.correlation(V)[..., 0, 1],
                   "log V_11": lambda V: np.log(V[..., 0, 0])}.items():
    diffs = sde.compare_moments(stat(finite.V[~finite.stopped, -1]), stat(paths.V[~paths.stopped, -1]))
    print(f"{name:9s} " + ", ".join(f"{k}: {v.diff:+.4f} ({v.z:+.2f} SE)" for k, v in diffs.items()))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
bins = np.linspace(-1, 1, 41)
axes[0].hist(arrays["rho_finite"][~arrays["stopped_finite"]], bins, density=True, alpha=0.5,
             label=f"finite n={n}, d={d}")
axes[0].hist(arrays["rho_sde"][~arrays["stopped_sde"]], bins, density=True, histtype="step", lw=2,
             label=f"SDE T={cfg.T:.3g}")
axes[0].set(xlabel=r"$\rho_{12}$ at the last layer", ylabel="density",
            title=f"KS {metrics['ks_rho']:.3f}, W1 {metrics['w1_rho']:.3f}")
axes[0].legend()
for name in metrics["curves"]:  # shaped, unshaped, Pre-LN and the SDE, per layer
    t = arrays[f"curve_{name}_t"]
    line, = axes[1].plot(t, arrays[f"curve_{name}_rho_mean"], "--" if name == "sde" else "-", label=name)
    axes[1].fill_between(t, arrays[f"curve_{name}_rho_lo"], arrays[f"curve_{name}_rho_hi"],
                         color=line.get_color(), alpha=0.12)
axes[1].set(xlabel="t = layer / width", ylabel=r"mean $\rho_{12}$ (band: 5-95 %)")
axes[1].legend()
plt.show()

# %% [markdown]
# Without shaping (plain softmax attention, same residual weights) or with Pre-LN, the tokens'
# correlation drifts towards 1 with depth (rank collapse); the shaped network follows the SDE.

# %% [markdown]
# ## Width sweep at fixed T = d / n
# Distances to the SDE against the width, with the KS sampling floor: below about twice the
# floor the finite-width bias is not resolved by these sample sizes, and no rate is fitted.

# %%
ws = metrics["width_sweep"]
widths = [r["width"] for r in ws["rows"]]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(widths, [r["ks_rho"] for r in ws["rows"]], "o-", label="KS")
ax.loglog(widths, [r["w1_rho"] for r in ws["rows"]], "s-", label="W1")
ax.axhline(ws["ks_noise_floor"], color="gray", ls=":", label="KS sampling floor")
ax.set(xlabel="width n (depth = T n)", ylabel="distance to the SDE")
ax.legend()
plt.show()
print("rates fitted:", ws["ks_rate"], ws["w1_rate"], "over widths", ws["resolved_widths"])
