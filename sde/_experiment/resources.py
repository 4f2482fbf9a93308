"""Memory guards of an experiment, checked before any work or output (docs/experiments.md §5).

The results (every unit's saved states, held in host memory while the analysis runs) must fit
in the host's available memory; each device's per-call batch (one chunk of samples or paths)
must fit in the device's memory and is lowered below ``config.chunk`` where that is enough.
A run that cannot fit is refused with one ValueError naming the parameter, the memory needed
and the memory available.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shaped_attn.memory import GIB, device_memory, host_memory

from .._mc.sampler import resolve_sampler, sample_bytes
from .._theory.solve import default_chunk_size
from .config import ExperimentConfig
from .units import plan, unit_count, unit_states

RESULT_COPIES = 3
"""Host copies of the results during a run: the chunks, the concatenated ensembles and the
analysis's views (an upper estimate)."""

DEVICE_SHARE = 0.5
"""Fraction of a device's memory one call's batch may take (the rest: XLA's buffers)."""


@dataclasses.dataclass(frozen=True)
class ResourcePlan:
    """Per-device batches and the memory they were checked against (bytes).

    Attributes:
      finite_batch, sde_batch: samples / paths per device per compiled call.
      results_bytes: host memory the results take (times :data:`RESULT_COPIES`).
      host_bytes, device_bytes: memory available on the host and on one device.
    """

    finite_batch: int
    sde_batch: int
    results_bytes: int
    host_bytes: int
    device_bytes: int


def _fit(name: str, value: int, item: str, batch: int, per_item: int, device: int) -> int:
    """``batch`` lowered until ``batch * per_item`` fits in ``DEVICE_SHARE * device``."""
    fits = int(DEVICE_SHARE * device // per_item)
    if fits < 1:
        raise ValueError(f"{name}={value}: one {item} needs {per_item / GIB:.3g} GiB of device memory, "
                         f"{DEVICE_SHARE * device / GIB:.3g} GiB available")
    return min(batch, fits)


def check_resources(cfg: ExperimentConfig) -> ResourcePlan:
    """The per-device batches of ``cfg``'s units, after checking that its results fit in host
    memory and one sample or path in device memory (ValueError otherwise: one line naming the
    parameter, the memory needed and the memory available)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    state = cfg.m * cfg.m * itemsize
    kept = {"finite": 0, "sde": 0}
    for unit in plan(cfg):
        kept["sde" if unit[0].endswith("sde") else "finite"] += unit_count(cfg, unit) * unit_states(cfg, unit)
    results = RESULT_COPIES * (kept["finite"] + kept["sde"]) * state
    host = host_memory()
    if results > host:
        name, value = ("samples", cfg.samples) if kept["finite"] >= kept["sde"] else ("sde_paths", cfg.sde_paths)
        raise ValueError(f"{name}={value} (depth={cfg.depth}, m={cfg.m}): the results need "
                         f"{results / GIB:.3g} GiB of host memory, {host / GIB:.3g} GiB available")
    device = device_memory(host)
    block = cfg.block_config("shaped", cfg.gamma)(max((cfg.width, *cfg.sweep_widths, *cfg.convergence_widths)))
    per_sample = sample_bytes(block, cfg.m, cfg.depth, resolve_sampler(block, cfg.sampler))
    saves = unit_states(cfg, ("sde", cfg.gamma, cfg.T, cfg.tau0))
    per_path = (saves + 10) * state  # its saved states and a step's m x m temporaries (noise included)
    finite_batch = _fit("width", block.width, "network", cfg.chunk, per_sample, device)
    sde_batch = _fit("m", cfg.m, "SDE path", min(cfg.chunk, default_chunk_size(cfg.m)), per_path, device)
    return ResourcePlan(finite_batch, sde_batch, int(results), host, device)
