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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/shaped-attn/blob/main/notebooks/03_training_and_stability.ipynb)
#
# # 03 · Training and stability
#
# Train a small LeViT-like classifier on the 8x8 digits (shipped with scikit-learn) with
# several attention activations using the library's training loop, compare gradient norms at
# initialisation for shaped, Pre-LN and Post-LN stacks, and follow the attention matrices'
# Frobenius norm and entropy during training.

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
    activations=("softmax", "polynomial3") if QUICK else ("softmax", "norm_sinmax", "norm_sin10max+before_scaling",
                                                         "polynomial3", "shaped_softmax"),
    depth=2 if QUICK else 4,
    width=16 if QUICK else 64,
    heads=2 if QUICK else 4,
    steps=30 if QUICK else 600,
    batch_size=32 if QUICK else 64,
    log_every=5 if QUICK else 25,
    grad_depth=4 if QUICK else 32,      # gradient norms at init
    grad_width=16 if QUICK else 128,
    grad_tokens=8 if QUICK else 16,
    grad_seeds=1 if QUICK else 5,
)
print("QUICK" if QUICK else "FULL", SIZES)

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from shaped_attn import data, diagnostics, levit, training
from shaped_attn.config import post_ln_config, pre_ln_config, shaped_config
from shaped_attn.models import Stack

ds = data.load("digits")
print(ds)
eval_batches = data.eval_batches(ds.x_test, ds.y_test, 512)

# %% [markdown]
# ## Training with several activations
# Same model, optimiser (AdamW, warmup + cosine) and batches; only the attention activation
# changes. `levit.classifier_loss` also logs per-layer attention diagnostics. A label
# `NAME+before_scaling` moves the pre-normalisation of a `norm_` activation before the
# `1/sqrt(d)` scaling, as in the periodic paper's training script: `norm_sin10max+before_scaling`
# is that script's `norm_sinmax`, while our `norm_sinmax` follows the authors' module file
# (`docs/activations.md`).

# %%
import dataclasses

tcfg = training.TrainConfig(steps=SIZES["steps"], learning_rate=4e-3, warmup_steps=max(1, SIZES["steps"] // 10),
                            weight_decay=0.05, grad_clip_norm=1.0, log_every=SIZES["log_every"])
results = {}
for act in SIZES["activations"]:
    name, _, order = act.partition("+")
    cfg = levit.levit_config(name, grid=4, depth=SIZES["depth"], width=SIZES["width"],
                             num_heads=SIZES["heads"], mlp_ratio=2, num_classes=ds.num_classes,
                             image_size=ds.image_size, channels=ds.channels)
    if order:
        attention = dataclasses.replace(cfg.block.attention, prenorm_order=order)
        cfg = dataclasses.replace(cfg, block=dataclasses.replace(cfg.block, attention=attention))
    model = levit.build(cfg, seed=0)
    stream = data.batches(ds.x_train, ds.y_train, SIZES["batch_size"], seed=0)
    res = training.train(model, levit.classifier_loss, stream, tcfg,
                         eval_fn=levit.classifier_eval, eval_batches=eval_batches)
    results[act] = res
    print(f"{act:16s} test accuracy {res.final_eval['accuracy']:.3f}, "
          f"final train loss {res.final_train['loss']:.3f}, {res.wall_time_s:.1f} s")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for act, res in results.items():
    steps = [r["step"] for r in res.history]
    axes[0].plot(steps, [r["train/loss"] for r in res.history], label=act)
    axes[1].plot(steps, [r["train/accuracy"] for r in res.history], label=act)
axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
axes[1].set(xlabel="step", ylabel="training accuracy")
axes[1].legend()
plt.show()

# %% [markdown]
# ## Attention norm and entropy during training
# Per layer, `||A||_F / sqrt(N)` (at most 1 for softmax) and the mean row entropy, as logged
# by the training loop (means over each logging interval).

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for i, (act, res) in enumerate(results.items()):
    steps = [r["step"] for r in res.history]
    frob = np.array([r["train/attn_frobenius_over_sqrt_n"] for r in res.history], float)
    ent = np.array([r["train/attn_entropy"] for r in res.history], float)
    for layer in range(frob.shape[1]):
        ls = ["-", "--", ":", "-."][layer % 4]
        axes[0].plot(steps, frob[:, layer], ls, color=f"C{i}", label=f"{act} L{layer + 1}")
        axes[1].plot(steps, ent[:, layer], ls, color=f"C{i}", label=f"{act} L{layer + 1}")
axes[0].set(xlabel="step", ylabel="||A||_F / sqrt(N)", yscale="log")
axes[1].set(xlabel="step", ylabel="attention entropy (nats)")
axes[1].axhline(math.log(16), color="k", lw=0.8, ls=":")  # uniform over the 4x4 grid
axes[0].legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Gradient norms at initialisation: shaped vs Pre-LN vs Post-LN
# Noci et al. (Fig. 2): per-layer gradient norms of the query and value weights of a deep
# stack on Gaussian tokens, with a cross-entropy loss on a fixed random readout
# (`diagnostics.init_gradient_norms`).

# %%
W, D = SIZES["grad_width"], SIZES["grad_depth"]
blocks = {
    "shaped": lambda: shaped_config(W, 1 / math.sqrt(8), param_dtype="float32"),
    "pre_ln": lambda: pre_ln_config(W, num_heads=1),
    "post_ln": lambda: post_ln_config(W, num_heads=1),
}
grads = {}
for kind, make in blocks.items():
    per_seed = []
    for seed in range(SIZES["grad_seeds"]):
        k_model, k_x, k_head, k_y = jax.random.split(jax.random.PRNGKey(1000 + seed), 4)
        stack = Stack(make(), D, rngs=nnx.Rngs(params=k_model))
        x = jax.random.normal(k_x, (8, SIZES["grad_tokens"], W))
        head = jax.random.normal(k_head, (W, 10)) / math.sqrt(W)
        y = jax.random.randint(k_y, (8,), 0, 10)

        def loss(model, x=x, head=head, y=y):
            return training.cross_entropy(model(x).mean(axis=-2) @ head, y)

        per_seed.append(diagnostics.init_gradient_norms(stack, loss, ("query", "value")))
    grads[kind] = {k: np.mean([g[k] for g in per_seed], axis=0) for k in ("query", "value")}
    print(f"{kind:8s} query grad norm, first/last layer: "
          f"{grads[kind]['query'][0]:.3g} / {grads[kind]['query'][-1]:.3g}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for kind, g in grads.items():
    for ax, name in zip(axes, ("query", "value")):
        ax.semilogy(np.arange(1, D + 1), g[name], "o-", ms=3, label=kind)
for ax, name in zip(axes, ("query", "value")):
    ax.set(xlabel="layer", ylabel=f"||dL/dW_{name}||_F at init")
axes[0].legend()
plt.show()
