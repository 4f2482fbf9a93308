"""Every public entry point rejects bad parameters before any work, with one ValueError line
naming the parameter, its value and the allowed range (issue 9): sde.SDEParams, sde.solve,
sde.solve_correlation, sde.simulate_finite, sde.estimate_coefficients, shaped_attn configs."""

import functools
import math

import jax
import numpy as np
import pytest

import sde
from sde._helpers import validation
from shaped_attn import config as mc

V_OK = 0.8 * np.eye(3) + 0.2
NON_SYMMETRIC = V_OK + np.triu(np.ones((3, 3)), 1)
NOT_PSD = np.diag([1.0, -1.0, 1.0])
WITH_NAN = np.where(np.eye(3) > 0, np.nan, 0.2)
WITH_INF = np.where(np.eye(3) > 0, np.inf, 0.2)
KEY = jax.random.key(0)
P = sde.SDEParams(gamma=0.5)
P_MLP = sde.SDEParams(gamma=0.5, block="mlp")
BLOCK = functools.partial(mc.shaped_config, gamma=0.5)


def _rejects(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value), "one line"


PARAMS = [
    (dict(gamma=0.0), r"gamma=0.0 is outside \(0, 1\]"),
    (dict(gamma=1.5), r"gamma=1.5 is outside \(0, 1\]"),
    (dict(gamma=-0.1), r"gamma=-0.1 is outside \(0, 1\]"),
    (dict(gamma=math.nan), r"gamma=nan is outside \(0, 1\]"),
    (dict(gamma=math.inf), r"gamma=inf is outside \(0, 1\]"),
    (dict(gamma=0.5, tau0=0.0), r"tau0=0.0 is outside \(0, inf\]"),
    (dict(gamma=0.5, tau0=-2.0), r"tau0=-2.0 is outside \(0, inf\]"),
    (dict(gamma=0.5, tau0=math.nan), r"tau0=nan is outside \(0, inf\]"),
    (dict(gamma=0.5, c_plus=math.nan), "c_plus=nan must be finite"),
    (dict(gamma=0.5, c_minus=math.inf), "c_minus=inf must be finite"),
    (dict(gamma=0.5, heads=0), "heads=0 must be an integer >= 1"),
    (dict(gamma=0.5, block="conv"), "block='conv' is not one of"),
    (dict(gamma=0.5, head_layout="stack"), "head_layout='stack' is not one of"),
    (dict(gamma=0.5, activation="bogus"), r"activation='bogus': the theory knows only 'softmax' by name"),
    (dict(gamma=0.5, mlp_scale=0.0), r"mlp_scale=0.0 is outside \(0, inf\)"),
]


@pytest.mark.parametrize("kwargs, match", PARAMS)
def test_sde_params(kwargs, match):
    _rejects(lambda: sde.SDEParams(**kwargs), match)


SOLVE = [
    (dict(V0=V_OK, num_paths=0), "num_paths=0 must be an integer >= 1"),
    (dict(V0=V_OK, num_paths=-3), "num_paths=-3 must be an integer >= 1"),
    (dict(V0=V_OK, dt=0.0), r"dt=0.0 is outside \(0, T=1.0\]"),
    (dict(V0=V_OK, dt=-0.1), r"dt=-0.1 is outside \(0, T=1.0\]"),
    (dict(V0=V_OK, dt=2.0), r"dt=2.0 is outside \(0, T=1.0\]"),
    (dict(V0=V_OK, dt=math.nan), r"dt=nan is outside \(0, T=1.0\]"),
    (dict(V0=V_OK, T=0.0), r"T=0.0 is outside \(0, inf\)"),
    (dict(V0=V_OK, T=math.inf), r"T=inf is outside \(0, inf\)"),
    (dict(V0=V_OK, stop_norm=math.nan), r"stop_norm=nan is outside \(0, inf\)"),
    (dict(V0=V_OK, save_every=0), "save_every=0 must be an integer >= 1"),
    (dict(V0=V_OK, noise="exact"), "noise='exact' is not one of"),
    (dict(V0=V_OK, factor="qr"), "factor='qr' is not one of"),
    (dict(V0=NON_SYMMETRIC), r"V0 is not symmetric: max \|V0 - V0\^T\| = 1"),
    (dict(V0=NOT_PSD), r"V0 is not positive semi-definite \(not PSD\): smallest eigenvalue -1"),
    (dict(V0=WITH_NAN), "V0 holds NaN or inf"),
    (dict(V0=WITH_INF), "V0 holds NaN or inf"),
]


@pytest.mark.parametrize("kwargs, match", SOLVE)
def test_solve(kwargs, match):
    args = dict(T=1.0, dt=0.1, num_paths=2, key=KEY) | kwargs
    _rejects(lambda: sde.solve(args.pop("V0"), P, **args), match)


CORRELATION = [
    (dict(num_paths=0), "num_paths=0 must be an integer >= 1"),
    (dict(dt=0.0), r"dt=0.0 is outside \(0, T=1.0\]"),
    (dict(dt=3.0), r"dt=3.0 is outside \(0, T=1.0\]"),
    (dict(rho0=math.nan), r"rho0=nan is outside \[-1, 1\]"),
    (dict(rho0=1.5), r"rho0=1.5 is outside \[-1, 1\]"),
    (dict(params=P), "params.block='transformer': solve_correlation needs block='mlp'"),
]


@pytest.mark.parametrize("kwargs, match", CORRELATION)
def test_solve_correlation(kwargs, match):
    args = dict(rho0=0.2, params=P_MLP, T=1.0, dt=0.1, num_paths=2, key=KEY) | kwargs
    _rejects(lambda: sde.solve_correlation(args.pop("rho0"), args.pop("params"), **args), match)


FINITE = [
    (dict(width=0), "width=0 must be an integer >= 1"),
    (dict(width=3), "width=3 must be at least m [+] 1 = 4"),
    (dict(depth=0), "depth=0 must be an integer >= 1"),
    (dict(num_samples=0), "num_samples=0 must be an integer >= 1"),
    (dict(chunk_size=0), "chunk_size=0 must be an integer >= 1"),
    (dict(sampler="loop"), "sampler='loop' is not one of"),
    (dict(stop_norm=0.0), r"stop_norm=0.0 is outside \(0, inf\)"),
    (dict(stop_norm=math.nan), r"stop_norm=nan is outside \(0, inf\)"),
    (dict(V0=NON_SYMMETRIC), "V0 is not symmetric"),
    (dict(V0=NOT_PSD), r"V0 is not positive semi-definite \(not PSD\)"),
    (dict(V0=WITH_NAN), "V0 holds NaN or inf"),
    (dict(V0=WITH_INF), "V0 holds NaN or inf"),
]


@pytest.mark.parametrize("kwargs, match", FINITE)
def test_simulate_finite(kwargs, match):
    args = dict(V0=V_OK, width=8, depth=2, num_samples=2) | kwargs
    _rejects(lambda: sde.simulate_finite(args.pop("V0"), BLOCK, key=KEY, **args), match)


ESTIMATOR = [
    (dict(width=0), "width=0 must be an integer >= 1"),
    (dict(num_samples=0), "num_samples=0 must be an integer >= 1"),
    (dict(width=None, widths=(0, 8)), "width=0 must be an integer >= 1"),
    (dict(width=None, widths=(8, 16), num_samples=(0, 4)), "num_samples=0 must be an integer >= 1"),
    (dict(chunk_size=0), "chunk_size=0 must be an integer >= 1"),
    (dict(sampler="loop"), "sampler='loop' is not one of"),
    (dict(V=NON_SYMMETRIC), "V is not symmetric"),
    (dict(V=NOT_PSD), r"V is not positive semi-definite \(not PSD\)"),
    (dict(V=WITH_NAN), "V holds NaN or inf"),
]


@pytest.mark.parametrize("kwargs, match", ESTIMATOR)
def test_estimate_coefficients(kwargs, match):
    args = dict(V=V_OK, width=8, num_samples=4) | kwargs
    _rejects(lambda: sde.estimate_coefficients(BLOCK, args.pop("V"), key=KEY, **args), match)


CONFIGS = [
    (lambda: mc.shaped_config(8, 0.0), "gamma=0.0"),
    (lambda: mc.shaped_config(8, 1.5), "gamma=1.5"),
    (lambda: mc.shaped_config(8, math.nan), "gamma=nan"),
    (lambda: mc.shaped_config(8, 0.5, tau0=0.0), "tau0=0.0"),
    (lambda: mc.shaped_config(8, 0.5, tau0=math.nan), "tau0=nan"),
    (lambda: mc.shaped_config(0, 0.5), "width=0 must be an integer >= 1"),
    (lambda: mc.shaped_config(8, 0.5, num_heads=0), "num_heads=0 must be an integer >= 1"),
    (lambda: mc.shaped_config(8, 0.5, activation="bogus"), "activation 'bogus'"),
    (lambda: mc.shaped_config(8, 0.5, sublayers="conv"), "sublayers='conv' is not one of"),
    (lambda: mc.StackConfig(mc.shaped_config(8, 0.5), 0), "depth=0 must be an integer >= 1"),
    (lambda: mc.AttentionConfig(8, temperature="hot"), "temperature='hot' is not one of"),
    (lambda: mc.BlockConfig(mc.AttentionConfig(8), kind="conv"), "kind='conv' is not one of"),
]


@pytest.mark.parametrize("call, match", CONFIGS)
def test_shaped_attn_configs(call, match):
    _rejects(call, match)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: validation.check_number("x", 2.0, 0, 1, hi_closed=True), r"x=2.0 is outside \(0, 1\]"),
        (lambda: validation.check_number("x", 0.0, 0, 1, lo_closed=True), None),
        (lambda: validation.check_number("x", "a", 0, 1), "x='a' must be a real number"),
        (lambda: validation.check_number("x", math.inf), r"x=inf is outside \(0, inf\)"),
        (lambda: validation.check_int("n", True), "n=True must be an integer >= 1"),
        (lambda: validation.check_int("n", 2.0), "n=2.0 must be an integer >= 1"),
        (lambda: validation.check_int("n", 5, lo=0, hi=4), r"n=5 must be an integer in \[0, 4\]"),
        (lambda: validation.check_psd_matrix("V", np.ones((2, 3))), r"V must be a square \(m, m\) matrix"),
    ],
)
def test_shared_helpers(call, match):
    if match is None:
        assert call() == 0.0
    else:
        _rejects(call, match)
