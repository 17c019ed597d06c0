"""IEMOCAP, 4-class emotion recognition, from the MMIN-style feature release (h5 + npy).

Layout under ``{root}/{subdir}`` (as read by ``datasets/IEMODataset.py:IEMOData`` in zrguo/CGGM,
which follows ``AIM3-RUC/MMIN:data/multimodal_dataset.py``)::

    A/comparE.h5               utterance id -> (frames, 130) ComParE LLDs
    A/comparE_mean_std.h5      group "<fold>" with datasets "mean" (130,) and "std" (130,)
    V/denseface.h5             utterance id -> (frames, 342) DenseFace features
    L/bert_large.h5            utterance id -> (tokens, 1024) BERT-large features
    target/<fold>/{trn,val,tst}_label.npy     (N, 4) one-hot labels (argmax = class)
    target/<fold>/{trn,val,tst}_int2name.npy  (N, 1) byte-string utterance ids

Modalities, in model order (``datasets.md``): ``audio`` (350, 130), ``vision`` (50, 342),
``text`` (22, 1024). Per item, as the official loader does: audio is normalised with the fold's
train mean / std (``audio_norm="trn"``; MMIN's ``"utt"`` per-utterance option is available), then
every modality is zero-padded at the end to its fixed maximum length. The official collate pads
audio to 350 and vision / text to the longest in the batch; here all three have fixed lengths
(``*_max_len``) so that batches have one shape. An utterance longer than its maximum raises a
DataError at construction (the official loader crashes on audio > 350); raise the maximum rather
than truncating silently. Class order is the release's one-hot column order (MMIN: 4 classes; the
paper lists happy, angry, sad, neutral; the column order is not re-mapped).

All ids, shapes and labels are checked when the dataset is built (h5 metadata only, no feature
reads); features are read lazily per item, or once into memory with ``in_memory=True``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.config import ConfigBase
from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset
from mmbalance.datasets.splits import as_str_list, data_dir, require_file
from mmbalance.errors import DataError, ShapeError

__all__ = ["IEMOCAP", "IEMOCAPConfig", "IEMOCAPSplit", "AUDIO_NORMS"]

AUDIO_NORMS = ("trn", "utt", "none")
MODALITIES = ("audio", "vision", "text")
FOLDERS = {"audio": "A", "vision": "V", "text": "L"}
RELEASE_SPLITS = {"train": "trn", "val": "val", "test": "tst"}


@dataclass(frozen=True)
class IEMOCAPConfig(ConfigBase):
    root: str = ""  # data root (--data-root); files are read from root/subdir
    subdir: str = "iemocap"  # folder under root; "" reads root itself
    fold: int = 1  # MMIN cross-validation fold, target/<fold>/ (CGGM uses 1; MMIN ships 1-10)
    audio_feature: str = "comparE"  # A/<name>.h5 (and A/<name>_mean_std.h5 for audio_norm="trn")
    vision_feature: str = "denseface"  # V/<name>.h5
    text_feature: str = "bert_large"  # L/<name>.h5
    # "trn": fold train mean/std (CGGM, opt.norm_method) | "utt": per utterance | "none"
    audio_norm: str = "trn"
    audio_max_len: int = 350  # frames; zero-padded to this length (CGGM collate_fn)
    vision_max_len: int = 50  # frames (CGGM get_seq_len)
    text_max_len: int = 22  # tokens (CGGM get_seq_len)
    in_memory: bool = False  # read every feature into RAM at construction (unpadded)

    def check(self) -> None:
        if not isinstance(self.fold, int) or self.fold < 1:
            raise ValueError(f"fold must be an integer >= 1, got {self.fold!r}")
        if self.audio_norm not in AUDIO_NORMS:
            raise ValueError(f"audio_norm must be one of {AUDIO_NORMS}, got {self.audio_norm!r}")
        for name in ("audio_max_len", "vision_max_len", "text_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _H5Reader:
    """Opens an h5 file on first use in each process (DataLoader workers fork or spawn)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._pid = -1

    def get(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": -1}


class IEMOCAPSplit(Dataset):
    """One split: items ``{"audio", "vision", "text": float32 (max_len, d), "target": int64 ()}``."""

    def __init__(
        self,
        names: list[str],
        labels: np.ndarray,
        readers: dict[str, _H5Reader],
        max_len: dict[str, int],
        dims: dict[str, int],
        audio_norm: str,
        mean_std: tuple[Tensor, Tensor] | None,
        memory: dict[str, dict[str, np.ndarray]] | None,
    ) -> None:
        self.names = names
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.readers = readers
        self.max_len = max_len
        self.dims = dims
        self.audio_norm = audio_norm
        self.mean_std = mean_std
        self.memory = memory

    def __len__(self) -> int:
        return len(self.names)

    def _raw(self, modality: str, name: str) -> Tensor:
        if self.memory is not None:
            return torch.from_numpy(self.memory[modality][name])
        return torch.from_numpy(np.asarray(self.readers[modality].get()[name][()], dtype=np.float32))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        name = self.names[index]
        item: dict[str, Tensor] = {}
        for m in MODALITIES:
            feat = self._raw(m, name).float()
            if m == "audio":
                if self.audio_norm == "trn":
                    mean, std = self.mean_std  # type: ignore[misc]
                    feat = (feat - mean) / std
                elif self.audio_norm == "utt":
                    mean_f = feat.mean(dim=0, keepdim=True)
                    std_f = feat.std(dim=0, keepdim=True) if feat.shape[0] > 1 else torch.ones_like(mean_f)
                    std_f = torch.where(std_f == 0, torch.ones_like(std_f), std_f)  # as MMIN normalize_on_utt
                    feat = (feat - mean_f) / std_f
            padded = feat.new_zeros(self.max_len[m], self.dims[m])
            padded[: feat.shape[0]] = feat
            item[m] = padded
        item["target"] = self.labels[index]
        return item


@register_dataset("iemocap")
class IEMOCAP(MultimodalDataset):
    """IEMOCAP 4-class emotion recognition on MMIN features, one cross-validation fold."""

    Config = IEMOCAPConfig
    paper = "Busso et al., IEMOCAP: Interactive emotional dyadic motion capture database (LRE 2008)"
    task = "cls"
    modality_names = MODALITIES
    default_model = "mult"
    default_preset = "iemocap"

    @classmethod
    def required_files(cls, config: Any, folder: Path) -> list[tuple[Path, str]]:
        names = {"audio": config.audio_feature, "vision": config.vision_feature, "text": config.text_feature}
        files = [(folder / FOLDERS[m] / f"{names[m]}.h5", f"{m} features") for m in MODALITIES]
        target = folder / "target" / str(config.fold)
        for tag in RELEASE_SPLITS.values():
            files += [(target / f"{tag}_label.npy", "labels")]
            files += [(target / f"{tag}_int2name.npy", "utterance ids")]
        return files

    def __init__(self, config: IEMOCAPConfig) -> None:
        super().__init__(config)
        folder = data_dir("iemocap", config.root, config.subdir, "datasets/iemocap/README.md")
        self.folder = folder
        features = {
            "audio": config.audio_feature, "vision": config.vision_feature, "text": config.text_feature
        }
        self.paths = {
            m: require_file(
                folder / FOLDERS[m] / f"{features[m]}.h5",
                f"an h5 file of utterance id -> (length, dim) {m} features",
            )
            for m in MODALITIES
        }
        self.max_len = {
            "audio": config.audio_max_len, "vision": config.vision_max_len, "text": config.text_max_len
        }
        target_dir = folder / "target" / str(config.fold)
        if not target_dir.is_dir():
            targets = folder / "target"
            folds = sorted(p.name for p in targets.glob("*") if p.is_dir()) if targets.is_dir() else []
            raise DataError(
                f"fold {config.fold}: folder {str(target_dir)!r} does not exist; "
                f"expected target/<fold>/ with {{trn,val,tst}}_label.npy and _int2name.npy "
                f"(folds found: {folds or 'none'})"
            )
        names: dict[str, list[str]] = {}
        labels: dict[str, np.ndarray] = {}
        num_classes = None
        for split, tag in RELEASE_SPLITS.items():
            names[split], labels[split], width = self._read_targets(target_dir, tag)
            if num_classes is None:
                num_classes = width
            elif width != num_classes:
                raise ShapeError(
                    f"{target_dir / f'{tag}_label.npy'}: {width} label columns, "
                    f"expected {num_classes} as in trn_label.npy"
                )
        assert num_classes is not None
        self.dims = self._check_features(names)
        self.mean_std = self._read_mean_std(folder, config) if config.audio_norm == "trn" else None
        self.memory = self._load_all(names) if config.in_memory else None
        self._readers = {m: _H5Reader(p) for m, p in self.paths.items()}
        self._names, self._labels = names, labels
        self.spec = DatasetSpec(
            task="cls",
            modalities={m: (self.max_len[m], self.dims[m]) for m in MODALITIES},
            num_outputs=num_classes,
            target_shape=(),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes={
                "release": "IEMOCAP, MMIN feature release",
                "fold": config.fold,
                "val_split": f"the release's target/{config.fold}/val split",
                "features": features,
                "audio_norm": config.audio_norm,
                "padding": {m: f"zeros at the end to {self.max_len[m]}" for m in MODALITIES},
                "classes": "one-hot column order of the release (paper: happy, angry, sad, neutral)",
                "sizes": {s: len(n) for s, n in names.items()},
                "class_counts": {s: np.bincount(labels[s], minlength=num_classes).tolist() for s in labels},
            },
        )

    # -- construction-time checks --------------------------------------------------------------
    @staticmethod
    def _read_targets(target_dir: Path, tag: str) -> tuple[list[str], np.ndarray, int]:
        label_path = require_file(target_dir / f"{tag}_label.npy", "an (N, C) one-hot label array")
        name_path = require_file(target_dir / f"{tag}_int2name.npy", "an (N, 1) array of utterance ids")
        try:
            onehot = np.load(label_path, allow_pickle=False)
            raw_names = np.load(name_path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(
                f"{target_dir}: cannot read {tag}_label.npy / {tag}_int2name.npy ({exc})"
            ) from exc
        if onehot.ndim != 2 or onehot.shape[1] < 2:
            raise ShapeError(
                f"{label_path}: shape {onehot.shape}, expected (N, C) one-hot labels with C >= 2"
            )
        valid = np.isin(onehot, (0, 1)).all(axis=1) & (onehot.sum(axis=1) == 1)
        if not valid.all():
            row = int(np.flatnonzero(~valid)[0])
            raise DataError(
                f"{label_path}: label out of range at row {row}: {onehot[row].tolist()}; "
                f"expected one-hot rows of {onehot.shape[1]} classes ({int((~valid).sum())} such rows)"
            )
        if raw_names.ndim not in (1, 2) or (raw_names.ndim == 2 and raw_names.shape[1] != 1):
            raise ShapeError(f"{name_path}: shape {raw_names.shape}, expected (N, 1) or (N,) utterance ids")
        ids = as_str_list(list(raw_names), str(name_path))
        if len(ids) != len(onehot):
            raise ShapeError(f"{name_path}: {len(ids)} ids, expected {len(onehot)} like {label_path.name}")
        return ids, onehot.argmax(axis=1).astype(np.int64), int(onehot.shape[1])

    def _check_features(self, names: dict[str, list[str]]) -> dict[str, int]:
        """Every listed id is in every feature file as a (length, dim) array; one dim per file
        (the most common one; the first utterance that differs is reported); lengths fit."""
        dims: dict[str, int] = {}
        for m in MODALITIES:
            path = self.paths[m]
            try:
                fh = h5py.File(path, "r")
            except OSError as exc:
                raise DataError(f"{path}: cannot be opened as HDF5 ({exc})") from exc
            shapes: dict[str, tuple[int, int]] = {}
            with fh:
                for split, ids in names.items():
                    for utt in ids:
                        if utt not in fh:
                            raise DataError(
                                f"{path}: missing utterance {utt!r} listed in the {split} split of fold "
                                f"{self.config.fold}; expected one {m} feature array per utterance id"
                            )
                        node = fh[utt]
                        if not isinstance(node, h5py.Dataset) or len(node.shape) != 2:
                            shape = getattr(node, "shape", "a group")
                            raise ShapeError(f"{path}[{utt!r}]: {shape}, expected a (length, dim) array")
                        shapes[utt] = tuple(node.shape)  # type: ignore[assignment]
            counts = Counter(dim for _, dim in shapes.values())
            dims[m] = counts.most_common(1)[0][0]
            for utt, (length, dim) in shapes.items():
                if dim != dims[m]:
                    raise ShapeError(
                        f"{path}[{utt!r}]: feature dim {dim}, expected {dims[m]} like the other "
                        f"{counts[dims[m]]} utterances"
                    )
                if length > self.max_len[m]:
                    raise DataError(
                        f"{path}[{utt!r}]: {m} length {length} exceeds {m}_max_len={self.max_len[m]}; "
                        f"raise {m}_max_len (the loader pads, it never truncates)"
                    )
        return dims

    def _read_mean_std(self, folder: Path, config: IEMOCAPConfig) -> tuple[Tensor, Tensor]:
        path = require_file(
            folder / "A" / f"{config.audio_feature}_mean_std.h5",
            f"group '{config.fold}' with 'mean' and 'std' ({self.dims['audio']},) arrays (audio_norm='trn')",
        )
        key = str(config.fold)
        try:
            with h5py.File(path, "r") as fh:
                if key not in fh or "mean" not in fh[key] or "std" not in fh[key]:
                    raise DataError(
                        f"{path}: missing key '{key}/mean' or '{key}/std'; expected the fold's train "
                        "statistics"
                    )
                mean = np.asarray(fh[key]["mean"][()], dtype=np.float32).reshape(-1)
                std = np.asarray(fh[key]["std"][()], dtype=np.float32).reshape(-1)
        except OSError as exc:  # truncated or not HDF5
            raise DataError(f"{path}: cannot be read as HDF5 ({exc})") from exc
        d = self.dims["audio"]
        if mean.shape != (d,) or std.shape != (d,):
            raise ShapeError(f"{path}['{key}']: mean {mean.shape}, std {std.shape}, expected ({d},) each")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise DataError(
                f"{path}['{key}']: mean/std must be finite with std > 0 (MMIN writes 1 where std is 0)"
            )
        return torch.from_numpy(mean).unsqueeze(0), torch.from_numpy(std).unsqueeze(0)

    def _load_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
        wanted = sorted({n for ids in names.values() for n in ids})
        memory: dict[str, dict[str, np.ndarray]] = {}
        for m, path in self.paths.items():
            try:
                with h5py.File(path, "r") as fh:
                    memory[m] = {n: np.asarray(fh[n][()], dtype=np.float32) for n in wanted}
            except OSError as exc:
                raise DataError(f"{path}: cannot be read as HDF5 ({exc})") from exc
        return memory

    def split(self, split: str) -> Dataset:
        self.check_split_name(split)
        return IEMOCAPSplit(
            self._names[split],
            self._labels[split],
            self._readers,
            self.max_len,
            self.dims,
            self.config.audio_norm,
            self.mean_std,
            self.memory,
        )
