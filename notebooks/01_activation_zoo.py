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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/shaped-attn/blob/main/notebooks/01_activation_zoo.ipynb)
#
# # 01 · The activation zoo
#
# Every attention activation registered in `shaped_attn.activations`: the weights it puts on a
# row of scores, how it treats masks, how its Jacobian (the gradient that flows back to the
# scores) behaves as the score spread grows, and the Frobenius bounds of softmax.

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
    n_keys=8 if QUICK else 32,          # keys per row
    n_rows=64 if QUICK else 4096,       # rows per Jacobian statistic
    stds=(0.5, 2.0, 8.0) if QUICK else (0.25, 0.5, 1, 2, 4, 8, 16, 32),
    bound_trials=16 if QUICK else 2048,
    # Jacobian sweep: compiling one program per activation dominates CPU time, so the quick
    # (CI) run sweeps a representative subset; the full run sweeps every activation.
    sweep_names=("softmax", "norm_sinmax", "polynomial3", "shaped_softmax") if QUICK else None,
)
print("QUICK" if QUICK else "FULL", SIZES)

# %%
import math

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from shaped_attn import activations, diagnostics

NAMES = activations.names()
N = SIZES["n_keys"]
print(len(NAMES), "activations:", ", ".join(NAMES))

# %% [markdown]
# ## Weights on one score row
# One row of standard normal scores (sorted, for readability). `shaped_softmax` needs square
# score matrices, so every activation sees an `N x N` matrix and we plot row 0.

# %%
key = jax.random.PRNGKey(0)
scores = jax.random.normal(key, (N, N))
scores = scores.at[0].set(jnp.sort(scores[0]))
cols = 5
rows = math.ceil(len(NAMES) / cols)
fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), sharex=True)
for ax, name in zip(axes.flat, NAMES):
    w = np.asarray(activations.get(name)(scores))[0]
    ax.bar(np.arange(N), w, color="C0")
    ax.set_title(f"{name}\nsum={w.sum():.2f}", fontsize=8)
for ax in axes.flat[len(NAMES):]:
    ax.axis("off")
fig.suptitle("weights of row 0 (scores sorted ascending)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Masking
# A causal mask (`True` = may attend) and a fully masked row: masked weights must be exactly 0,
# a fully masked row returns zeros, and nothing is NaN — even with `-inf` in masked positions.

# %%
causal = jnp.tril(jnp.ones((N, N), bool))
masked_scores = jnp.where(causal, scores, -jnp.inf)
full = causal.at[1].set(False)  # row 1: no valid key at all
rows_out = []
for name in NAMES:
    w = activations.get(name)(masked_scores, full)
    rows_out.append((name,
                     bool(jnp.all(jnp.isfinite(w))),
                     bool(jnp.all(jnp.where(full, 0.0, w) == 0)),
                     bool(jnp.all(w[1] == 0))))
print(f"{'activation':22s} finite  masked=0  empty-row=0")
for name, fin, m0, e0 in rows_out:
    print(f"{name:22s} {fin!s:6s}  {m0!s:8s}  {e0!s}")
assert all(all(r[1:]) for r in rows_out)

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, name in zip(axes, ("softmax", "polynomial3", "shaped_softmax")):
    im = ax.imshow(np.asarray(activations.get(name)(masked_scores, full)), cmap="RdBu_r")
    ax.set_title(f"{name}, causal + row 1 empty", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()

# %% [markdown]
# ## Row sums from tiny to large scores
# Row-normalised maps divide by `sum_j f(s_j)`. For the non-negative maps the division is exact,
# so rows sum to 1 at every score scale (`docs/activations.md`, "Guards"); the signed maps
# (`sinmax`, `cosmax`) keep the sign of the sum and floor it relative to the row's own scale:
# where `sum f` nearly cancels, rounding shows in their row sums and their weights grow (at
# most to 1e4), at every scale alike.

# %%
scales = np.logspace(-6, 2, 17)
row_names = ("sin2max", "sin2max_shifted", "sirenmax", "sin10max", "softmax", "sinmax", "cosmax")
base = jax.random.normal(jax.random.PRNGKey(4), (256, N))
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for i, name in enumerate(row_names):
    sums = np.array([np.asarray(activations.get(name)(base * c)).sum(-1) for c in scales])
    err = np.abs(sums - 1).max(axis=1)
    axes[0].loglog(scales, np.maximum(err, 1e-9), "o-", ms=3, color=f"C{i}", label=name)
    big = [float(np.abs(np.asarray(activations.get(name)(base * c))).max()) for c in scales]
    axes[1].loglog(scales, big, "o-", ms=3, color=f"C{i}", label=name)
axes[0].axhline(1e-5, color="k", ls=":", lw=0.8)
axes[0].set(xlabel="score scale", ylabel="max |row sum - 1| (floored at 1e-9)")
axes[1].set(xlabel="score scale", ylabel="largest |weight|")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# ## The authors' two code versions
# Wang et al.'s module file standardises the scores after the `1/sqrt(d)` scaling (our
# `norm_` default); their training script standardises `q.k` before it, which leaves scores of
# std `1/sqrt(d)`, and its `sinmax` is `1 + sin(10 s)` (our `sin10max`). The layer option
# `prenorm_order="before_scaling"` reproduces the script (`docs/activations.md`).

# %%
from shaped_attn import functional
from shaped_attn.config import AttentionConfig

d = 64
qk = jax.random.normal(jax.random.PRNGKey(5), (N, N)) * 2.0 * math.sqrt(d)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
for ax, name in zip(axes, ("norm_softmax", "norm_sin10max", "norm_cosmax")):
    for order, style in (("after_scaling", "o-"), ("before_scaling", "s--")):
        att = AttentionConfig(width=d, activation=name, prenorm_order=order)
        w = np.asarray(functional.attention_weights(att, qk))[0]
        ax.plot(np.sort(w)[::-1], style, ms=3, label=order)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("key (sorted by weight)")
axes[0].set_ylabel("weight, row 0")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# ## In a Flax layer
# `shaped_attn.attention_fn(name)` is an `attention_fn` for `nnx.MultiHeadAttention` (and
# `flax.linen.MultiHeadDotProductAttention`). With `"softmax"` it reproduces Flax's own layer.

# %%
import shaped_attn
from flax import nnx

x = jax.random.normal(jax.random.PRNGKey(6), (2, N, 32))
make = lambda fn: nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0),
                                         attention_fn=fn)
flax_out = make(nnx.dot_product_attention)(x, is_causal=True)
ours = make(shaped_attn.attention_fn("softmax"))(x, is_causal=True)
print("max |ours - Flax| with softmax:", float(jnp.abs(ours - flax_out).max()))
layer = make(shaped_attn.attention_fn("sin2max_shifted"))
out = layer(x, is_causal=True, sow_weights=True)
w = nnx.pop(layer, nnx.Intermediate)["attention_weights"].get_value()[0]
fig, ax = plt.subplots(figsize=(4, 3.5))
im = ax.imshow(np.asarray(w[0, 0]), cmap="viridis")
ax.set_title("sin2max_shifted in nnx.MultiHeadAttention\n(head 0, causal)", fontsize=9)
fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()

# %% [markdown]
# ## Jacobian norm and saturation vs score spread
# `diagnostics.jacobian_sweep` draws rows of normal scores with growing std and reports the
# median Frobenius norm of each row's Jacobian `dw/ds` and the *saturation* fraction (rows
# whose norm is below 5 % of softmax's at uniform scores).

# %%
settings = [{"kind": "normal", "std": float(s)} for s in SIZES["stds"]]
SWEEP = SIZES["sweep_names"] or NAMES
sweep = {name: diagnostics.jacobian_sweep(name, jax.random.PRNGKey(1), settings,
                                          n_rows=SIZES["n_rows"], n_keys=N)
         for name in SWEEP}
stds = np.array(SIZES["stds"], float)
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
for i, name in enumerate(SWEEP):
    style = dict(color=plt.cm.tab20(i / len(SWEEP)), label=name, marker="o", ms=3)
    axes[0].loglog(stds, [max(r["frobenius_median"], 1e-12) for r in sweep[name]], **style)
    axes[1].semilogx(stds, [r["saturation"] for r in sweep[name]], **style)
axes[0].axhline(diagnostics.default_saturation_threshold(N), color="k", ls=":", lw=0.8)
axes[0].set(xlabel="score std", ylabel="median ||dw/ds||_F per row")
axes[1].set(xlabel="score std", ylabel="saturated fraction of rows")
axes[1].legend(fontsize=6, ncol=2)
plt.show()
print("softmax saturation by std:", [round(r["saturation"], 3) for r in sweep["softmax"]])

# %% [markdown]
# ## Softmax Frobenius bounds
# Saratchandran et al. (Thm. 3.1): `||softmax(A)||_F <= sqrt(N)` for every `A`, and
# `||d softmax(A)/dA||_F <= 2 sqrt(N)`. Checked on random score matrices at many scales.

# %%
scales = jnp.logspace(-2, 2, SIZES["bound_trials"])
A = jax.random.normal(jax.random.PRNGKey(2), (SIZES["bound_trials"], N, N)) * scales[:, None, None]
ratio = np.asarray(diagnostics.softmax_frobenius_bound_ratio(A))
gratio = np.asarray(diagnostics.softmax_gradient_bound_ratio(A))
print(f"max ||softmax(A)||_F / sqrt(N)       = {ratio.max():.4f}  (bound 1)")
print(f"max ||d softmax/dA||_F / (2 sqrt(N)) = {gratio.max():.4f}  (bound 1)")
assert ratio.max() <= 1 + 1e-5 and gratio.max() <= 1 + 1e-5
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogx(np.asarray(scales), ratio, ".", ms=3, label="||softmax(A)||_F / sqrt(N)")
ax.semilogx(np.asarray(scales), gratio, ".", ms=3, label="||J||_F / (2 sqrt(N))")
ax.axhline(1, color="k", lw=0.8)
ax.set(xlabel="score scale", ylabel="ratio to bound")
ax.legend()
plt.show()

# %% [markdown]
# ## polynomial3 at Gaussian initialisation
# `s^3 / sqrt(N)` with unit-variance scores: `E s^6 = 15`, so `E ||A||_F^2 = N^2 * 15 / N`,
# i.e. `||A||_F ≈ sqrt(15 N)` — not bounded by `sqrt(N)` like softmax, but of the same order.

# %%
G = jax.random.normal(jax.random.PRNGKey(3), (SIZES["bound_trials"], N, N))
poly = np.asarray(diagnostics.frobenius_norm(activations.get("polynomial3")(G)))
soft = np.asarray(diagnostics.frobenius_norm(activations.softmax(G)))
print(f"N={N}: mean ||poly3||_F = {poly.mean():.3f}, sqrt(15 N) = {math.sqrt(15 * N):.3f}, "
      f"mean ||softmax||_F = {soft.mean():.3f}, sqrt(N) = {math.sqrt(N):.3f}")
