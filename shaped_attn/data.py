"""Image classification data: an embedded offline default and CIFAR-10 when available.

* ``"digits"`` (default, no network): the 8x8 handwritten digits shipped inside scikit-learn
  (1797 images, 10 classes, UCI optdigits test set). Deterministic stratified split
  (default 1347 train / 450 test), pixels scaled to ``[0, 1]`` then standardised with the
  training set's mean and std. Images are ``[N, 8, 8, 1]`` float32, labels int32.
* ``"cifar10"``: through Hugging Face ``datasets`` or ``tensorflow-datasets`` when one is
  installed and the data is cached or the network answers within a short timeout. Otherwise
  :class:`DatasetUnavailableError` is raised at once, naming the embedded alternative.

Batches come from :func:`batches`, a seeded infinite iterator (a new permutation every epoch).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
from typing import Iterator, Optional

import numpy as np

NETWORK_TIMEOUT_S = 3.0
"""Seconds to wait for a connection to a dataset host before declaring the network absent."""

DATASETS = ("digits", "cifar10")


class DatasetUnavailableError(RuntimeError):
    """A dataset that needs an optional package or the network cannot be loaded here."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train/test images ``[N, H, W, C]`` (float32, standardised) and int32 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[3])

    def __repr__(self) -> str:  # arrays are large; show shapes only
        return (
            f"ImageDataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Indices of a deterministic stratified split (per class, a seeded permutation)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float = 0.25, split_seed: int = 0, image_size: int = 8) -> ImageDataset:
    """scikit-learn's 8x8 digits, split deterministically (stratified, ``split_seed``).

    ``image_size`` > 8 resizes the images bilinearly (``scipy.ndimage.zoom``, order 1), e.g.
    to 16 or 32 so that a conv stem can produce 4, 16 or 64 tokens.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} must lie in (0, 1)")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size={image_size!r} must be an integer >= 8")
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - sklearn is in the test/notebook extras
        raise DatasetUnavailableError(
            "the embedded 'digits' dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = _load()
    x = bunch.images.astype(np.float64) / 16.0
    if image_size != 8:
        from scipy.ndimage import zoom

        x = zoom(x, (1, image_size / 8, image_size / 8), order=1, mode="nearest", grid_mode=True)
    x = x[..., None]
    y = bunch.target.astype(np.int32)
    tr, te = _stratified_split(y, test_fraction, split_seed)
    x_train, x_test = _standardise(x[tr], x[te])
    return ImageDataset("digits", x_train, y[tr], x_test, y[te], num_classes=10)


def network_available(host: str, port: int = 443, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"CIFAR-10 is not available: {reason}. Use the embedded offline dataset instead: "
        f"load('digits') (or --dataset digits in the scripts); for CIFAR-10 install the "
        f"optional extra (pip install 'shaped-attn[datasets]') and run with network access once."
    )


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install raising anything else
        return None


def _cifar_from_hf(hf) -> tuple[np.ndarray, ...]:
    ds = hf.load_dataset("cifar10")
    out = []
    for split in ("train", "test"):
        part = ds[split].with_format("numpy")
        img_key = "img" if "img" in part.column_names else "image"
        out += [np.asarray(part[img_key]), np.asarray(part["label"])]
    return tuple(out)


def _cifar_from_tfds(tfds) -> tuple[np.ndarray, ...]:
    out = []
    for split in ("train", "test"):
        x, y = tfds.as_numpy(tfds.load("cifar10", split=split, as_supervised=True, batch_size=-1))
        out += [np.asarray(x), np.asarray(y)]
    return tuple(out)


def _hf_cached() -> bool:
    """Whether Hugging Face's cache already holds a cifar10 dataset (no network needed)."""
    root = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")),
        "datasets",
    )
    return os.path.isdir(root) and any("cifar10" in d for d in os.listdir(root))


def load_cifar10(timeout: float = NETWORK_TIMEOUT_S) -> ImageDataset:
    """CIFAR-10 (50000/10000, 32x32x3) via Hugging Face ``datasets`` or tensorflow-datasets.

    Raises :class:`DatasetUnavailableError` quickly (within about ``timeout`` seconds per
    host probed) when neither package is installed, or when the data is not cached and the
    network does not answer.
    """
    hf, tfds = _import("datasets"), _import("tensorflow_datasets")
    if hf is None and tfds is None:
        raise _unavailable("neither Hugging Face 'datasets' nor 'tensorflow_datasets' is installed")
    arrays = None
    errors = []
    if hf is not None:
        if _hf_cached() or network_available("huggingface.co", timeout=timeout):
            try:
                arrays = _cifar_from_hf(hf)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(f"datasets: {type(err).__name__}: {err}")
        else:
            errors.append("datasets: huggingface.co unreachable and no cached copy")
    if arrays is None and tfds is not None:
        try:
            prepared = tfds.builder("cifar10").is_prepared()
        except Exception:  # noqa: BLE001
            prepared = False
        if prepared or network_available("storage.googleapis.com", timeout=timeout):
            try:
                arrays = _cifar_from_tfds(tfds)
            except Exception as err:  # noqa: BLE001
                errors.append(f"tensorflow_datasets: {type(err).__name__}: {err}")
        else:
            errors.append("tensorflow_datasets: storage.googleapis.com unreachable, not prepared")
    if arrays is None:
        raise _unavailable("; ".join(errors))
    x_tr, y_tr, x_te, y_te = arrays
    x_tr, x_te = _standardise(x_tr.astype(np.float64) / 255.0, x_te.astype(np.float64) / 255.0)
    return ImageDataset("cifar10", x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), 10)


def load(name: str = "digits", **kwargs) -> ImageDataset:
    """Load a dataset by name: ``"digits"`` (embedded, offline) or ``"cifar10"``."""
    if name == "digits":
        return load_digits(**kwargs)
    if name == "cifar10":
        return load_cifar10(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS} ('digits' needs no network)")


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int = 0,
    epochs: Optional[int] = None,
    drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded iterator of ``{"x": ..., "y": ...}`` batches, reshuffled every epoch.

    ``epochs=None`` repeats forever. With ``drop_last`` every batch has ``batch_size``
    examples (one compiled shape); the dropped remainder changes from epoch to epoch.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must lie in [1, {n}]")
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = rng.permutation(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = perm[start : start + batch_size]
            yield {"x": x[idx], "y": y[idx]}
        epoch += 1


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The whole split in order, in batches of ``batch_size`` (the last one may be smaller)."""
    return [{"x": x[i : i + batch_size], "y": y[i : i + batch_size]} for i in range(0, len(x), batch_size)]
