"""Byte-level text for causal language modelling: an embedded offline corpus and, optionally,
a Hugging Face text data set.

* ``"stdlib"`` (default; no network, no download): the source code of the running
  interpreter's standard library, the kind of data (code) of the shaped Transformer paper's
  initialisation study. Files: every ``*.py`` directly in ``sysconfig.get_paths()["stdlib"]``
  (sub-packages such as ``test/`` excluded), in sorted name order. Split: a file goes to
  validation when ``zlib.crc32(file name) % 10 == 0`` (about 10 % of the files), otherwise to
  training, so a file's split never depends on which other files exist. Each split is its
  files' bytes joined by a newline. The text differs between Python versions; compare runs
  through :attr:`TextDataset.fingerprint`.
* ``"wikitext2"`` / ``"wikitext103"``: the raw WikiText sets through Hugging Face
  ``datasets`` (cached, or downloaded when huggingface.co answers); otherwise
  :class:`shaped_attn.data.DatasetUnavailableError` names the embedded default.

Tokens are bytes (vocabulary 256). :func:`batches` draws seeded random windows;
:func:`eval_batches` takes fixed, evenly spaced windows of the validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import DatasetUnavailableError, network_available

VOCAB_SIZE = 256
VALIDATION_MODULUS = 10
"""A stdlib file is in the validation split when ``crc32(name) % VALIDATION_MODULUS == 0``."""
HF_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"),
               "wikitext103": ("wikitext", "wikitext-103-raw-v1")}
TEXT_DATASETS = ("stdlib", *HF_DATASETS)


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Train and validation byte streams (``uint8``) of one corpus.

    Attributes:
        name: the data set's name.
        train, validation: the splits as 1-d ``uint8`` arrays.
        files: ``(name, split)`` of every source file (the stdlib corpus; empty otherwise).
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    files: tuple[tuple[str, str], ...] = ()

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of both splits: equal data, equal fingerprint."""
        h = hashlib.sha256(self.train.tobytes())
        h.update(b"\0validation\0" + self.validation.tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"TextDataset({self.name!r}, train={self.train.size} bytes, "
                f"validation={self.validation.size} bytes, fingerprint={self.fingerprint})")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The corpus files: ``*.py`` directly in ``root`` (default: this interpreter's stdlib),
    sorted by name."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)


def is_validation(name: str) -> bool:
    """The documented split rule: ``zlib.crc32(name) % VALIDATION_MODULUS == 0``."""
    return zlib.crc32(name.encode()) % VALIDATION_MODULUS == 0


def load_stdlib(root: str | Path | None = None) -> TextDataset:
    """The embedded corpus (see the module docstring); ``root`` overrides the directory."""
    files = stdlib_files(root)
    if not files:
        raise DatasetUnavailableError(f"no *.py files in {root or sysconfig.get_paths()['stdlib']}")
    parts: dict[str, list[bytes]] = {"train": [], "validation": []}
    listing = []
    for path in files:
        split = "validation" if is_validation(path.name) else "train"
        parts[split].append(path.read_bytes())
        listing.append((path.name, split))
    if not parts["validation"] or not parts["train"]:
        raise DatasetUnavailableError(f"the split of {len(files)} files left one side empty")
    arrays = {k: np.frombuffer(b"\n".join(v), dtype=np.uint8) for k, v in parts.items()}
    return TextDataset("stdlib", arrays["train"], arrays["validation"], tuple(listing))


def _unavailable(name: str, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"{name} is not available: {reason}. Use the embedded offline corpus instead: "
        f"load('stdlib') (or --dataset stdlib in the scripts: the standard library's source, "
        f"no network needed); for {name} install 'datasets' (pip install 'shaped-attn[datasets]') "
        f"and run with network access once."
    )


def load_hf(name: str) -> TextDataset:
    """A raw WikiText set as bytes (UTF-8 of its lines), via Hugging Face ``datasets``."""
    path, config = HF_DATASETS[name]
    try:
        hf = importlib.import_module("datasets")
    except Exception:  # ImportError, or a broken install raising anything else
        raise _unavailable(name, "the 'datasets' package is not installed") from None
    if not network_available("huggingface.co"):
        try:  # a cached copy loads without the network
            ds = hf.load_dataset(path, config, download_mode="reuse_cache_if_exists")
        except Exception as err:  # noqa: BLE001 - reported in the message
            raise _unavailable(name, f"huggingface.co unreachable and no usable cache ({type(err).__name__})") from None
    else:
        ds = hf.load_dataset(path, config)
    splits = [np.frombuffer("".join(ds[s]["text"]).encode(), dtype=np.uint8)
              for s in ("train", "validation")]
    return TextDataset(name, *splits)


def load(name: str = "stdlib") -> TextDataset:
    """A text data set by name: ``"stdlib"`` (embedded, offline) or one of :data:`HF_DATASETS`."""
    if name == "stdlib":
        return load_stdlib()
    if name in HF_DATASETS:
        return load_hf(name)
    raise ValueError(f"unknown text dataset {name!r}; known: {TEXT_DATASETS} ('stdlib' needs no network)")


def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(length)].astype(np.int32)


def batches(stream: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[dict]:
    """Endless ``{"tokens": int32 [batch_size, seq_len + 1]}``: windows at seeded uniform
    random offsets (inputs ``tokens[:, :-1]``, next-byte targets ``tokens[:, 1:]``)."""
    span = stream.size - seq_len - 1
    if span < 1:
        raise ValueError(f"seq_len={seq_len} needs a stream longer than {seq_len + 1} bytes")
    rng = np.random.default_rng(seed)
    while True:
        yield {"tokens": _windows(stream, rng.integers(0, span + 1, batch_size), seq_len + 1)}


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[dict]:
    """``num_batches`` fixed batches of windows at evenly spaced offsets over the stream."""
    span = stream.size - seq_len - 1
    if span < 0:
        raise ValueError(f"seq_len={seq_len} needs a stream of at least {seq_len + 1} bytes")
    starts = np.linspace(0, span, batch_size * num_batches).astype(np.int64)
    return [{"tokens": _windows(stream, s, seq_len + 1)} for s in starts.reshape(num_batches, batch_size)]
