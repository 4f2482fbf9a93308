"""``SDEParams.from_block``: the SDE of a finite block's configuration, and a clear refusal,
naming the reason, for blocks that have none (docs/model.md §2)."""

import math

import pytest

import sde
from shaped_attn import config as mc


@pytest.mark.parametrize("sublayers, block", [("both", "transformer"), ("attention", "attention"), ("mlp", "mlp")])
def test_shaped_blocks_map_to_their_sde(sublayers, block):
    cfg = mc.shaped_config(64, 0.4, tau0=0.7, c_plus=0.3, c_minus=-0.8, sublayers=sublayers)
    assert sde.SDEParams.from_block(cfg) == sde.SDEParams(gamma=0.4, tau0=0.7, c_plus=0.3, c_minus=-0.8, block=block)


def test_heads_layouts_zero_queries_and_paper_init():
    heads = mc.shaped_config(64, 0.5, num_heads=4, out_proj=True)
    assert sde.SDEParams.from_block(heads) == sde.SDEParams(gamma=0.5, heads=4, head_layout="concat")
    summed = mc.shaped_config(64, 0.5, num_heads=2, head_dim=32, out_proj=False)
    assert sde.SDEParams.from_block(summed) == sde.SDEParams(gamma=0.5, heads=2, head_layout="sum")
    zero = sde.SDEParams.from_block(mc.shaped_config(64, 0.5, query_init="zero"))
    assert math.isinf(zero.tau0) and zero.acal_coeff == 0 and zero.attention_drift_coeff == 0
    # W_Q, W_K ~ N(0, n^{-3/2}) with tau = tau0 sqrt(n_k): the theory's tau0 (docs/model.md §1)
    paper = mc.shaped_config(64, 0.5, tau0=2.0, init="paper")
    assert sde.SDEParams.from_block(paper) == sde.SDEParams(gamma=0.5, tau0=2.0)


def test_activation_expansion_comes_from_the_registered_function():
    p = sde.SDEParams.from_block(mc.shaped_config(64, 0.5, activation="sin2max_shifted"))
    assert p.activation == sde.expansion("sin2max_shifted") and p.activation.name == "sin2max_shifted"
    assert p.activation.a1 != 1.0  # not softmax's constants
    with pytest.raises(ValueError, match="activation 'sin2max' has no small-score expansion"):
        sde.SDEParams.from_block(mc.shaped_config(64, 0.5, activation="sin2max"))
    # an MLP block has no attention: its activation is irrelevant
    assert sde.SDEParams.from_block(mc.shaped_config(64, 0.5, activation="sin2max", sublayers="mlp")).block == "mlp"


@pytest.mark.parametrize(
    "cfg, reason",
    [
        (mc.pre_ln_config(64), "kind='pre_ln' has LayerNorm"),
        (mc.post_ln_config(64), "kind='post_ln' has LayerNorm"),
        (mc.unshaped_config(64, 0.5), "kind='unshaped'"),
        (mc.shaped_config(64, 0.5, ablation="no_centre"), "centre_gain=0.0"),
        (mc.shaped_config(64, 0.5, ablation="no_identity"), "identity_gain=0.0"),
        (mc.shaped_config(64, 0.5, ablation="no_sqrt_n"), "the no_sqrt_n ablation"),
        (mc.shaped_config(64, 0.5, causal=True), "causal attention"),
        (mc.shaped_config(64, 0.5, init="standard"), "init='standard'"),
        (mc.shaped_config(64, 0.5, lam=0.5), "lam=0.5 is not sqrt(1 - gamma^2)"),
        (mc.shaped_config(64, 0.5, mlp_hidden=128), "mlp_hidden=128 differs from width=64"),
    ],
)
def test_blocks_without_a_limit_are_refused_with_the_reason(cfg, reason):
    with pytest.raises(ValueError, match="no covariance SDE") as err:
        sde.SDEParams.from_block(cfg)
    assert reason in str(err.value)


def test_theory_names_only_softmax():
    with pytest.raises(ValueError, match=r"activation='cosmax'.*sde.expansion\('cosmax'\)"):
        sde.SDEParams(gamma=0.5, activation="cosmax")
    p = sde.SDEParams(gamma=0.5, activation=sde.expansion("cosmax"))
    assert p == sde.SDEParams(gamma=0.5, activation=sde.expansion("cosmax")) and hash(p)
