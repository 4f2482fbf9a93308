"""Output directories of long runs: atomic writes, a config guard, resumable chunks.

Every file is written to a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX), so an interrupted run never leaves a half-written file.
Finished chunks (arrays as ``.npz``, records as ``.json``) are kept under ``chunks/``;
rerunning with the same config resumes from them. A directory holding a run with a
different config is refused unless ``overwrite=True``.
Results are read back with ``allow_pickle=False`` and JSON only: nothing executes data.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

PACKAGES = ("shaped-attn", "jax", "jaxlib", "flax", "optax", "diffrax", "numpy", "scipy")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write a non-finite number ({obj}) to JSON")
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write; NaN or inf anywhere in ``obj`` raises instead of being written."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomic ``np.savez`` of plain numeric arrays."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, never unpickling objects."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def environment() -> dict[str, Any]:
    """Package versions, Python, platform and the devices jax sees."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
    }


def save_figure(fig, stem, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save a matplotlib figure as ``stem.png`` and ``stem.pdf`` (atomically) and close it: the
    one figure writer of the scripts and the main job."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib only where figures are drawn)

    paths = []
    for ext in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight")
        path = Path(f"{stem}.{ext}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


class RunDir:
    """An output directory bound to one config.

    Arguments:
        path: the directory (created if missing).
        config: the resolved run config (JSON-able); stored in ``config.json`` with
            :func:`environment`.
        overwrite: discard a previous run with a different config instead of refusing.
        outputs: file names (or glob patterns) of a finished run's outputs, deleted with its
            chunks when ``overwrite`` discards it: no result of the old config is left beside
            the new config.
    """

    def __init__(self, path, config: dict, *, overwrite: bool = False, outputs: Sequence[str] = ()):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out={str(self.path)!r} exists and is not a directory")
        self.config = self.jsonable(config)
        stored = self.path / "config.json"
        if stored.exists():
            previous = json.loads(stored.read_text()).get("config")
            if previous != self.config:
                if not overwrite:
                    changed = sorted(
                        k for k in set(previous or {}) | set(self.config)
                        if (previous or {}).get(k) != self.config.get(k)
                    )
                    raise ValueError(
                        f"out={str(self.path)!r} holds a run with a different config "
                        f"(differs in: {', '.join(changed)}); pass --overwrite or choose another --out"
                    )
                shutil.rmtree(self.path / "chunks", ignore_errors=True)
                for path in [p for pattern in outputs for p in self.path.glob(pattern)]:
                    path.unlink(missing_ok=True)
        for tmp in [*self.path.glob(".*.tmp"), *self.path.glob("chunks/.*.tmp")]:  # left by a kill
            tmp.unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stored, {"config": self.config, "environment": environment()})
        except OSError as err:
            raise ValueError(f"out={str(self.path)!r} cannot be created or written: "
                             f"{err.strerror or err} ({err.filename or self.path})") from err

    @staticmethod
    def jsonable(config: dict) -> Any:
        """``config`` as it is stored in (and compared with) ``config.json``."""
        return _jsonable(config)

    def _chunk_path(self, name: str, index: int) -> Path:
        return self.path / "chunks" / f"{name}.{index:05d}.npz"

    def load_chunk(self, name: str, index: int) -> Optional[dict[str, np.ndarray]]:
        """A finished chunk, or ``None`` if it has not been written yet."""
        p = self._chunk_path(name, index)
        return read_npz(p) if p.exists() else None

    def save_chunk(self, name: str, index: int, **arrays: np.ndarray) -> None:
        atomic_write_npz(self._chunk_path(name, index), **arrays)

    def _record_path(self, name: str) -> Path:
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"record name {name!r} may only hold letters, digits and _ . + -")
        return self.path / "chunks" / f"{name}.json"

    def load_record(self, name: str) -> Optional[Any]:
        """A finished JSON record (one work unit), or ``None`` if it has not been written yet."""
        p = self._record_path(name)
        return json.loads(p.read_text()) if p.exists() else None

    def save_record(self, name: str, obj: Any) -> None:
        """Atomically write one work unit's JSON record (NaN or inf raise)."""
        atomic_write_json(self._record_path(name), obj)

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        atomic_write_json(p, obj)
        return p

    def write_npz(self, name: str, **arrays: np.ndarray) -> Path:
        p = self.path / name
        atomic_write_npz(p, **arrays)
        return p

    def save_figure(self, fig, stem: str) -> list[Path]:
        """:func:`save_figure` as ``stem.png`` and ``stem.pdf`` in this directory."""
        return save_figure(fig, self.path / stem)
