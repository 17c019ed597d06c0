"""Seeded split carving and data-folder helpers shared by the paper-dataset loaders.

Where a release has no validation (or test) split, one is carved from train with
:func:`carve_split`: a seeded permutation of the sample indices, independent of the run seed, so
that every run, method and seed sees the same validation samples. The fraction and the seed go
into ``DatasetSpec.notes`` (and from there into every result row).

All paper loaders read ``{root}/{subdir}``: ``--data-root DIR`` is the parent of every dataset
folder (``DIR/food101``, ``DIR/mosi``, ``DIR/iemocap``, ``DIR/brats2021``), and ``subdir=""``
points a loader at ``root`` itself. :func:`data_dir` resolves and checks that folder.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from mmbalance.errors import ConfigError, DataError

__all__ = [
    "carve_split",
    "split_sizes",
    "data_dir",
    "require_file",
    "read_split_file",
    "check_fraction",
    "as_str_list",
]

SPLIT_NAMES = ("train", "val", "test")


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` (the registry turns it into ConfigError) unless ``value`` is in (0, 1).

    With ``allow_zero`` the range is [0, 1).
    """
    low_ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, int | float) and low_ok and value < 1):
        expected = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {expected}, got {value!r}")


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """How many of ``n`` samples each carved part gets: ``round(fraction * n)``, at least 1.

    Raises:
        ConfigError: when the carved parts would leave fewer than one sample for the remainder.
    """
    sizes = {name: max(1, int(round(frac * n))) for name, frac in fractions.items() if frac > 0}
    if sum(sizes.values()) >= n:
        raise ConfigError(
            f"cannot carve {dict(fractions)} from {n} samples: the parts take {sizes}, "
            f"leaving {n - sum(sizes.values())} for training; expected at least 1"
        )
    return sizes


def carve_split(n: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split ``range(n)`` into seeded, disjoint parts.

    Args:
        n: number of samples (in a fixed, documented order, e.g. the release's row order or the
            sorted case ids).
        fractions: part name -> fraction of ``n`` (e.g. ``{"val": 0.1}``); parts with fraction 0
            are empty. The remainder is returned as ``"train"``.
        seed: seed of a NumPy ``PCG64`` generator; the same ``(n, fractions, seed)`` always gives the
            same parts, on every machine and NumPy version that keeps ``PCG64``'s stream.

    Returns:
        part name -> sorted int64 indices, plus ``"train"``; the parts partition ``range(n)``.
    """
    if "train" in fractions:
        raise ConfigError(
            "fractions name the carved parts; 'train' is the remainder and cannot be one of them"
        )
    if n < 2:
        raise ConfigError(f"cannot carve a split from {n} sample(s); expected at least 2")
    sizes = split_sizes(n, fractions)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in fractions:
        size = sizes.get(name, 0)
        out[name] = np.sort(order[start : start + size]).astype(np.int64)
        start += size
    out["train"] = np.sort(order[start:]).astype(np.int64)
    return out


def data_dir(dataset: str, root: str, subdir: str, readme: str) -> Path:
    """``Path(root) / subdir``, checked.

    Raises:
        ConfigError: ``root`` is empty (no ``--data-root`` given).
        DataError: the folder does not exist (names root, subdir and the README with the layout).
    """
    if not root:
        raise ConfigError(
            f"dataset {dataset!r} needs its data: pass --data-root DIR (or --set dataset.root=DIR); "
            f"the expected layout is described in {readme}"
        )
    path = Path(root).expanduser() / subdir if subdir else Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"dataset {dataset!r}: data folder {str(path)!r} does not exist "
            f"(root={root!r}, subdir={subdir!r}); "
            f"expected the layout described in {readme}"
        )
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise DataError naming it and what it should hold."""
    if not path.is_file():
        raise DataError(f"missing file {str(path)!r}: expected {what}")
    return path


def read_split_file(path: Path, known: Collection[str], source: str) -> dict[str, list[str]]:
    """Ids per split from a JSON file ``{"train": [...], "val": [...], "test": [...]}``.

    Args:
        path: the JSON file (already checked to exist, e.g. with :func:`require_file`).
        known: every valid id; each listed id must be one of them.
        source: where the valid ids come from, for the error message (``"the case folders of X"``).

    Returns:
        split name -> sorted ids; the three lists are disjoint.

    Raises:
        DataError: invalid JSON, a missing or non-list split, an unknown id, or an id in two splits.
    """
    try:
        listed = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    valid = set(known)
    out: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        if not isinstance(listed, dict) or not isinstance(listed.get(split), list):
            raise DataError(f"{path}: missing key {split!r}; expected lists of ids under train, val, test")
        unknown = [i for i in listed[split] if i not in valid]
        if unknown:
            raise DataError(f"{path}: id {unknown[0]!r} of split {split!r} is not among {source}")
        out[split] = sorted(listed[split])
    train, val, test = (set(out[split]) for split in SPLIT_NAMES)
    overlap = (train & val) | (train & test) | (val & test)
    if overlap:
        example = sorted(overlap)[0]
        raise DataError(f"{path}: ids in several splits, e.g. {example!r}; expected disjoint splits")
    return out


def as_str_list(values: Sequence[object], source: str) -> list[str]:
    """Decode ids stored as ``str``, ``bytes`` or 1-element arrays of either (MMIN's ``int2name``)."""
    out: list[str] = []
    for i, v in enumerate(values):
        item = v
        if isinstance(item, np.ndarray):
            if item.size != 1:
                raise DataError(f"{source}: entry {i} holds {item.size} values, expected one utterance id")
            item = item.reshape(()).item()
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            raise DataError(f"{source}: entry {i} is {type(item).__name__}, expected a str or bytes id")
        out.append(item)
    return out
