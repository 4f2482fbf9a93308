"""The work units of an experiment (:mod:`.units`), run chunk by chunk with resume
(docs/experiments.md §1).

A unit's key is ``fold_in(key(seed), crc32(name))``, so it depends on the seed and the unit's
identity only, and sample or path ``i`` of the unit uses ``fold_in(key, i)``. The finite-width
study's ``conv_sde`` units (width 0: the SDE; else its ReLU drift scaled to that width) all use
one key and Brownian increments on the finest grid, so they share their paths (common random
numbers). Each unit is stored in chunks of ``config.chunk`` samples; with a run directory
every finished chunk is written atomically and read back on a rerun, so an interrupted run
resumes to the same result. Missing chunks are computed one per device and call (consecutive
chunks grouped over the devices of every process, docs/experiments.md §4), each device in
batches of the :class:`ResourcePlan`'s size, so the numbers do not depend on the number of
devices or processes.
"""

from __future__ import annotations

import io
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from shaped_attn.rundir import RunDir

from .._helpers.devices import num_shards, sample_mesh, unit_key
from .._helpers.ensemble import Ensemble
from .._helpers.processes import is_writer, share_bytes
from .._mc.sampler import FiniteSampler, stop_samples
from .._theory.solve import solve
from .config import ExperimentConfig
from .convergence import relu_drift_factor, relu_scaled_params
from .resources import ResourcePlan, check_resources
from .units import plan, unit_count, unit_name

PER_UNIT = ("t",)
"""Chunk entries that describe the whole unit (the save times), not one sample each."""


def _groups(missing: list[int], size: int, partial: int) -> Iterator[list[int]]:
    """Runs of at most ``size`` consecutive chunk indices of ``missing``; the ``partial`` (last,
    shorter) chunk always alone, so that its batch is the same whatever ``size``."""
    group: list[int] = []
    for i in missing:
        if group and (len(group) == size or i != group[-1] + 1 or i == partial):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _share_stored(chunks: dict[int, dict]) -> dict[int, dict]:
    """Process 0's stored chunks on every process (as they are with one process)."""
    if jax.process_count() == 1:
        return chunks
    buf = io.BytesIO()
    if is_writer():
        np.savez(buf, **{f"{i}/{k}": v for i, chunk in chunks.items() for k, v in chunk.items()})
    out: dict[int, dict] = {}
    with np.load(io.BytesIO(share_bytes(buf.getvalue())), allow_pickle=False) as f:
        for entry in f.files:
            i, k = entry.split("/")
            out.setdefault(int(i), {})[k] = f[entry]
    return out


class Runner:
    """Runs the units of ``cfg``, storing and reusing chunks in ``run`` (None: in memory; in a
    run over several processes only process 0 has one), with the per-device batches of
    ``resources`` (default: :func:`check_resources`)."""

    def __init__(self, cfg: ExperimentConfig, run: Optional[RunDir] = None, progress: bool = False,
                 resources: Optional[ResourcePlan] = None):
        self.cfg, self.run, self.progress = cfg, run, progress
        self.resources = check_resources(cfg) if resources is None else resources
        self.timings: dict[str, float] = {}
        self._bar = None

    def _chunks(self, name: str, total: int, compute: Callable[[int, int], dict]) -> dict:
        """The chunks of one unit concatenated: stored ones read back, missing ones computed
        by ``compute(start, stop)`` over runs of consecutive chunks, one per device, and stored."""
        size, start_time = self.cfg.chunk, time.perf_counter()
        count = -(-total // size)
        stored = {}
        if self.run is not None:
            stored = {i: c for i in range(count) if (c := self.run.load_chunk(name, i)) is not None}
        parts = _share_stored(stored)
        self._advance(len(parts))
        missing = [i for i in range(count) if i not in parts]
        for group in _groups(missing, num_shards(sample_mesh()), count - 1 if total % size else -1):
            first = group[0] * size
            out = compute(first, min((group[-1] + 1) * size, total))
            for i in group:
                lo, hi = i * size - first, min((i + 1) * size, total) - first
                parts[i] = {k: v if k in PER_UNIT else v[lo:hi] for k, v in out.items()}
                if self.run is not None:
                    self.run.save_chunk(name, i, **parts[i])
            self._advance(len(group))
        self.timings[name] = time.perf_counter() - start_time
        return {k: np.concatenate([parts[i][k] for i in range(count)]) for k in parts[0]}

    def _advance(self, chunks: int) -> None:
        if self._bar is not None:
            self._bar.update(chunks)

    def finite(self, variant: str, gamma: float, width: int, depth: int, tau0: float) -> Ensemble:
        """The finite ensemble of one variant, times ``l / width``."""
        name = unit_name(self.cfg, ("finite", variant, gamma, width, depth, tau0))
        key = unit_key(self.cfg.seed, name)
        sampler: Optional[FiniteSampler] = None

        def compute(start, stop):
            nonlocal sampler
            if sampler is None:  # built (and compiled) only if some chunk is missing
                sampler = FiniteSampler(self.cfg.V0, self.cfg.block_config(variant, gamma, tau0),
                                        width=width, depth=depth, sampler=self.cfg.sampler)
            return {"V": sampler.chunk(key, start, stop, chunk_size=self.resources.finite_batch)}

        V = self._chunks(name, self.cfg.samples, compute)["V"]
        return stop_samples(V, width, self.cfg.stop_norm)

    def sde(self, gamma: float, T: float, tau0: float) -> Ensemble:
        """The SDE ensemble at ``gamma``, ``tau0`` up to ``T``."""
        name = unit_name(self.cfg, ("sde", gamma, T, tau0))
        key = unit_key(self.cfg.seed, name)
        dt, save_every = self.cfg.sde_grid(T)
        params = self.cfg.sde_params(gamma, tau0)

        def compute(start, stop):
            sol = solve(self.cfg.V0, params, T=T, dt=dt, num_paths=stop - start, key=key, first_path=start,
                        save_every=save_every, stop_norm=self.cfg.stop_norm,
                        chunk_size=self.resources.sde_batch).to_numpy()
            return {"V": sol.V, "stopped": sol.stopped, "stop_t": sol.stop_time, "t": sol.t[None]}

        out = self._chunks(name, self.cfg.sde_paths, compute)
        return Ensemble(t=out["t"][0], V=out["V"], stopped=out["stopped"], stop_time=out["stop_t"])

    def _last_states(self, name: str, total: int, T: float, compute: Callable[[int, int], Ensemble]) -> Ensemble:
        """A unit that keeps only the last state of each sample (the finite-width study)."""
        def last(start, stop):
            ens = compute(start, stop)
            return {"V": np.asarray(ens.V)[:, -1], "stopped": np.asarray(ens.stopped),
                    "stop_t": np.asarray(ens.stop_time)}

        out = self._chunks(name, total, last)
        return Ensemble(t=np.array([T]), V=out["V"][:, None], stopped=out["stopped"], stop_time=out["stop_t"])

    def conv_finite(self, width: int, depth: int, samples: int) -> Ensemble:
        """The last layer of ``samples`` shaped networks of one width of the finite-width study."""
        cfg = self.cfg
        name = unit_name(cfg, ("conv_finite", width, depth, samples))
        key = unit_key(cfg.seed, name)
        sampler: Optional[FiniteSampler] = None

        def compute(start, stop):
            nonlocal sampler
            if sampler is None:
                sampler = FiniteSampler(cfg.V0, cfg.block_config("shaped", cfg.gamma), width=width, depth=depth,
                                        sampler=cfg.sampler)
            V = sampler.chunk(key, start, stop, chunk_size=self.resources.finite_batch)
            return stop_samples(V, width, cfg.stop_norm)

        return self._last_states(name, samples, depth / width, compute)

    def conv_sde(self, steps: int, width: int) -> Ensemble:
        """The SDE at ``T`` with ``steps`` Euler steps on the study's shared Brownian paths
        (increments on the finest grid); ``width > 0``: its ReLU drift times the finite
        network's factor at that width, on the first ``convergence_slope_paths`` paths."""
        cfg = self.cfg
        name = unit_name(cfg, ("conv_sde", steps, width))
        key = unit_key(cfg.seed, "conv-sde")  # one key for every step size: common random numbers
        params = cfg.sde_params(cfg.gamma, cfg.tau0)
        if width:
            params = relu_scaled_params(params, relu_drift_factor(cfg, width))
        total = cfg.convergence_slope_paths if width else cfg.convergence_paths

        def compute(start, stop):
            return solve(cfg.V0, params, T=cfg.T, dt=cfg.T / steps, num_paths=stop - start, key=key,
                         first_path=start, save_every=steps, brownian_dt=cfg.T / cfg.convergence_steps,
                         stop_norm=cfg.stop_norm, chunk_size=self.resources.sde_batch).to_numpy()

        return self._last_states(name, total, cfg.T, compute)

    def execute(self) -> dict[tuple, Ensemble]:
        """Every unit of :func:`plan`, in order."""
        units = plan(self.cfg)
        run = {"finite": self.finite, "sde": self.sde, "conv_finite": self.conv_finite, "conv_sde": self.conv_sde}
        from tqdm.auto import tqdm  # noqa: PLC0415  (progress is optional)

        chunks = sum(-(-unit_count(self.cfg, u) // self.cfg.chunk) for u in units)
        with tqdm(total=chunks, desc="chunks", disable=not (self.progress and is_writer())) as bar:
            self._bar = bar
            out = {u: run[u[0]](*u[1:]) for u in units}
        self._bar = None
        return out
