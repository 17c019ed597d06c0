"""Frozen-backbone feature cache: run frozen extractors once per split, train on stored features.

Why: CGGM's Food-101 model (``zrguo/CGGM`` ``src/foodtrain.py``) runs a frozen ViT-B/16 and a
frozen BERT-base under ``no_grad`` on every step of every epoch, although their weights never
change. Without train-time augmentation a sample's token features are the same in every epoch, so
they can be computed once and only the small trainable part trained per step (``vit_bert`` with
``cache_features=true``; :meth:`mmbalance.models.vit_bert.VitBertBuilder.prepare_splits`).

Contract:

* **No train-time augmentation.** The cache stores one view per sample. A dataset whose spec
  records ``notes["augment"]`` true (the ``food101`` loader does), or a split whose dataset (or a
  wrapped ``.dataset``) has a truthy ``augment`` attribute, is refused with a ConfigError: build
  the dataset with ``augment=false``. This differs from the official Food-101 training, which
  augments (flip, colour jitter, grayscale, blur) and re-extracts every step.
* **Storage dtype.** Features are stored as ``float16`` by default (``float32`` on request): ViT
  and BERT outputs are LayerNorm-ed and well inside fp16 range; rounding is ~5e-4 relative. The
  trainable encoders cast them to their own dtype. Modalities without an extractor and the target
  are stored unchanged.
* **Where.** In memory (default; 379 KB per Food-101 sample at fp16, ~23 GB for the ~61k training
  pairs), or with ``cache_dir`` as ``.npy`` memory maps in
  ``<cache_dir>/<key>/<split>/`` that later runs reuse. ``key`` hashes the caller's
  ``dataset_key``, the extractors' identity (checkpoint files' sizes and mtimes, or a digest of
  randomly initialised weights) and the dtype. A split folder is complete only once its
  ``meta.json`` exists: it is written in a temporary folder that is renamed into place last, so an
  interrupted extraction is redone, never half-read.
* **Order.** Cached split ``i`` is the dataset's item ``i`` (extraction never shuffles).
* **RNG.** Extraction leaves the global RNG untouched (a private loader generator; the extractors
  are built from their own seed), so a run that extracts and a run that reuses a persisted cache
  train identically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmbalance.datasets.base import DatasetSpec, identity_collate
from mmbalance.errors import ConfigError, DataError, ShapeError

__all__ = ["CachedFeatures", "extract_features", "cache_splits", "cache_key", "load_cached", "FORMAT_VERSION"]

FORMAT_VERSION = 1  # bump when the on-disk layout changes (part of the key)


class CachedFeatures(Dataset):
    """Equally long per-sample arrays (torch tensors, or numpy memory maps) as a map-style dataset.

    ``__getitems__`` returns a whole batch dict with one indexing operation per key, so a
    ``DataLoader`` with ``identity_collate`` (what :func:`mmbalance.train.make_loader` picks) reads a
    batch without per-item collation.
    """

    def __init__(self, arrays: Mapping[str, Tensor | np.ndarray]) -> None:
        if not arrays:
            raise DataError("CachedFeatures needs at least one array, got none")
        lengths = {k: int(v.shape[0]) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ShapeError(f"cached arrays must have the same length, got {lengths}")
        self.arrays = dict(arrays)
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    @staticmethod
    def _take(array: Tensor | np.ndarray, index: Any) -> Tensor:
        if isinstance(array, Tensor):
            return array[index]
        out = array[index]  # fancy indexing copies; a scalar index gives a read-only memmap view
        if not (out.flags.writeable and out.flags.c_contiguous):
            out = np.array(out, order="C")
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: self._take(v, index) for k, v in self.arrays.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        out = {}
        for k, v in self.arrays.items():
            out[k] = v.index_select(0, torch.from_numpy(idx)) if isinstance(v, Tensor) else self._take(v, idx)
        return out


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as exc:
        raise ConfigError(
            f"dtype {dtype} cannot be stored in a numpy memory map; use float16 or float32"
        ) from exc


def _check_no_augmentation(dataset: Dataset, split: str) -> None:
    ds: Any = dataset
    seen = 0
    while ds is not None and seen < 8:
        if getattr(ds, "augment", False):
            raise ConfigError(
                f"cache_features=true stores one view per sample, but split {split!r} "
                f"({type(ds).__name__}) augments (augment=True); build the dataset with augment=false"
            )
        ds, seen = getattr(ds, "dataset", None), seen + 1


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    batched = hasattr(dataset, "__getitems__")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=identity_collate if batched else None,
        # A private generator: iterating a DataLoader draws its base seed from the global RNG
        # otherwise, and a run that extracts would then train with other dropout masks than a
        # run that reuses a cache.
        generator=torch.Generator(),
    )


def extract_features(
    dataset: Dataset,
    extractors: Mapping[str, nn.Module],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    batch_size: int = 64,
    out_dir: str | os.PathLike[str] | None = None,
) -> CachedFeatures:
    """One pass over ``dataset`` in order; keys in ``extractors`` are replaced by their features.

    Args:
        dataset: items (or ``__getitems__`` batches) ``{modality: Tensor, ..., "target": Tensor}``.
        extractors: modality -> frozen module mapping a batch to ``(B, *feature_shape)``; moved to
            ``device``, run under ``no_grad``.
        dtype: storage dtype of the extracted features (other keys keep theirs).
        out_dir: write ``<key>.npy`` memory maps there (the folder must not exist yet) instead of
            keeping tensors in memory.

    Raises:
        ShapeError: an extractor returns a shape other than its ``feature_shape`` or varies.
        DataError: the dataset yields fewer or more samples than ``len(dataset)``.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot cache features of an empty split")
    device = torch.device(device)
    for ex in extractors.values():
        ex.to(device)
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=False)
    arrays: dict[str, Tensor | np.ndarray] = {}
    start = 0
    with torch.no_grad():
        for batch in _loader(dataset, batch_size):
            size = int(next(iter(batch.values())).shape[0])
            if start + size > n:
                raise DataError(f"dataset yielded more than len(dataset)={n} samples")
            for key, value in batch.items():
                if key in extractors:
                    value = extractors[key](value.to(device)).to(dtype)
                    expected = getattr(extractors[key], "feature_shape", None)
                    if expected is not None and tuple(value.shape[1:]) != tuple(expected):
                        raise ShapeError(
                            f"extractor for {key!r} returned per-sample shape {tuple(value.shape[1:])}, "
                            f"expected {tuple(expected)}"
                        )
                value = value.detach().cpu()
                if key not in arrays:
                    shape = (n, *value.shape[1:])
                    if folder is None:
                        arrays[key] = torch.empty(shape, dtype=value.dtype)
                    else:
                        arrays[key] = np.lib.format.open_memmap(
                            folder / f"{key}.npy", mode="w+", dtype=_numpy_dtype(value.dtype), shape=shape
                        )
                target = arrays[key]
                if tuple(target.shape[1:]) != tuple(value.shape[1:]):
                    raise ShapeError(
                        f"key {key!r} changed per-sample shape within the split: {tuple(target.shape[1:])} "
                        f"then {tuple(value.shape[1:])}"
                    )
                if isinstance(target, Tensor):
                    target[start : start + size] = value
                else:
                    target[start : start + size] = value.numpy()
            start += size
    if start != n:
        raise DataError(f"dataset yielded {start} samples, expected len(dataset)={n}")
    for array in arrays.values():
        if isinstance(array, np.memmap):
            array.flush()
    return CachedFeatures(arrays)


def cache_key(dataset_key: str, extractors: Mapping[str, nn.Module], dtype: torch.dtype) -> str:
    """16 hex digits identifying (data, extractor weights and shapes, dtype, format)."""
    ident = {
        "format": FORMAT_VERSION,
        "dataset": dataset_key,
        "dtype": str(dtype),
        "extractors": {
            m: (ex.describe() if hasattr(ex, "describe") else type(ex).__name__)
            for m, ex in extractors.items()
        },
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(folder: str | os.PathLike[str], expected_len: int | None = None) -> CachedFeatures:
    """Open a complete cache folder (``meta.json`` + ``<key>.npy``) as memory maps.

    Raises:
        DataError: missing or unreadable file, or a shape/length differing from ``meta.json``.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        n, keys = int(meta["n"]), dict(meta["keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"feature cache {meta_path}: unreadable meta.json ({exc}); delete the folder to rebuild"
        ) from exc
    if expected_len is not None and n != expected_len:
        raise DataError(
            f"feature cache {folder} holds {n} samples, but the split has {expected_len}; "
            "delete it to rebuild"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, shape in keys.items():
        path = folder / f"{key}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"feature cache file {path}: unreadable ({exc}); delete {folder} to rebuild"
            ) from exc
        if list(array.shape) != list(shape):
            raise DataError(f"feature cache file {path}: shape {list(array.shape)}, meta.json says {shape}")
        arrays[key] = array
    return CachedFeatures(arrays)


def _extract_to_folder(
    dataset: Dataset, folder: Path, extractors: Mapping[str, nn.Module], **kwargs: Any
) -> CachedFeatures:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    cached = extract_features(dataset, extractors, out_dir=tmp, **kwargs)
    meta = {"n": len(cached), "keys": {k: list(v.shape) for k, v in cached.arrays.items()}}
    with open(tmp / "meta.json", "w") as fh:
        json.dump(meta, fh)
        fh.flush()
        os.fsync(fh.fileno())
    del cached
    if folder.exists():  # an incomplete earlier attempt (no meta.json)
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return load_cached(folder, expected_len=len(dataset))


def cache_splits(
    splits: Mapping[str, Dataset],
    extractors: Mapping[str, nn.Module],
    spec: DatasetSpec,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    dataset_key: str | None = None,
) -> tuple[dict[str, Dataset], DatasetSpec]:
    """Cache every split; returns the cached splits and ``spec`` with the feature shapes.

    Raises:
        ConfigError: an augmenting split, an extractor for a modality the spec lacks, or
            ``cache_dir`` without ``dataset_key``.
    """
    if not splits:
        raise ConfigError("cache_splits needs at least one split, got none")
    unknown = set(extractors) - set(spec.modality_names)
    if unknown:
        raise ConfigError(
            f"extractors for {sorted(unknown)} are not modalities of the dataset {spec.modality_names}"
        )
    if cache_dir is not None and not dataset_key:
        raise ConfigError(
            "cache_dir needs a dataset_key identifying the data (e.g. the dataset config as JSON), got none"
        )
    if spec.notes.get("augment"):
        raise ConfigError(
            "cache_features=true stores one view per sample, but the dataset records augment=True "
            "(spec.notes['augment']); build the dataset with augment=false"
        )
    for split, ds in splits.items():
        _check_no_augmentation(ds, split)
    key = cache_key(dataset_key or "", extractors, dtype) if cache_dir is not None else None
    kwargs = {"device": device, "dtype": dtype, "batch_size": batch_size}
    out: dict[str, Dataset] = {}
    for split, ds in splits.items():
        if cache_dir is None:
            out[split] = extract_features(ds, extractors, **kwargs)
            continue
        folder = Path(cache_dir) / str(key) / split
        if (folder / "meta.json").is_file():
            out[split] = load_cached(folder, expected_len=len(ds))
        else:
            out[split] = _extract_to_folder(ds, folder, extractors, **kwargs)
    first = next(iter(out.values()))
    assert isinstance(first, CachedFeatures)
    shapes = {
        m: tuple(int(d) for d in first.arrays[m].shape[1:]) if m in extractors else tuple(s)
        for m, s in spec.modalities.items()
    }
    note = {
        "dtype": str(dtype).replace("torch.", ""),
        "augmentation": "off",
        "key": key,
        "modalities": sorted(extractors),
    }
    new_spec = dataclasses.replace(spec, modalities=shapes, notes={**dict(spec.notes), "feature_cache": note})
    return out, new_spec
