"""CMU-MOSI and CMU-MOSEI (sentiment regression in [-3, 3]) from the MulT or the MMSA pickle.

Registered as ``mosi`` and ``mosei``; the two share formats and differ only in their default
folder and file names. Modalities, in model order: ``text`` (L_t, d_t), ``audio`` (L_a, d_a),
``vision`` (L_v, d_v); the lengths and feature widths are read from the pickle. Target: a float
scalar per sample.

Pickle flavours (``flavour``):

* ``"mult"`` - the MulT release read by the CGGM code (``datasets/CMUDataset.py:CMUData`` in
  zrguo/CGGM): ``data[split]`` for split in ``train`` / ``valid`` / ``test``, each a dict with
  ``text``, ``audio``, ``vision`` float arrays (N, L, d) and ``labels`` (N, 1, 1). Default file
  ``mosi_data.pkl`` (MOSEI: ``mosei_senti_data.pkl``).
* ``"mmsa"`` - the MMSA release (``aligned_50.pkl`` / ``unaligned_50.pkl``, read by
  ``thuiar/MMSA:src/MMSA/data_loader.py``): the same split dicts with ``text`` (N, 50, 768 BERT
  features), ``audio``, ``vision`` and ``regression_labels`` (N,). Default file ``aligned_50.pkl``.
  For ``unaligned_50.pkl`` the zero-padded arrays are used as they are (lengths are not needed by
  the MulT-style model), as MMSA does for models without length inputs.

As in both official loaders, ``-inf`` in ``audio`` is set to 0. Any other non-finite feature, a
label outside [-3, 3], a missing key or a shape that differs from the above raises a
:class:`~mmbalance.errors.DataError` / :class:`~mmbalance.errors.ShapeError` naming the file,
the split and what was expected. The release's own ``valid`` split is the validation split; test
is only ever the release's ``test`` split.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.config import ConfigBase
from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset, TensorDictDataset
from mmbalance.datasets.splits import data_dir, require_file
from mmbalance.errors import DataError, ShapeError

__all__ = ["MOSI", "MOSEI", "MOSIConfig", "MOSEIConfig", "load_sentiment_pickle", "FLAVOURS"]

FLAVOURS = ("mult", "mmsa")
MODALITIES = ("text", "audio", "vision")
# our split name -> the key used in both releases
RELEASE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
LABEL_RANGE = (-3.0, 3.0)  # CMU-MOSI / MOSEI sentiment scale


def _check_common(flavour: str, file: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if not isinstance(file, str):
        raise ValueError(f"file must be a file name (str), got {file!r}")


@dataclass(frozen=True)
class MOSIConfig(ConfigBase):
    root: str = ""  # data root (--data-root); the pickle is read from root/subdir/file
    subdir: str = "mosi"  # folder under root; "" reads root itself
    # "mult": MulT pickle, labels (N,1,1) | "mmsa": MMSA pickle, regression_labels (N,)
    flavour: str = "mult"
    # pickle name in the folder; "" = flavour default (mult: mosi_data.pkl, mmsa: aligned_50.pkl)
    file: str = ""

    def check(self) -> None:
        _check_common(self.flavour, self.file)


@dataclass(frozen=True)
class MOSEIConfig(ConfigBase):
    root: str = ""  # data root (--data-root); the pickle is read from root/subdir/file
    subdir: str = "mosei"  # folder under root; "" reads root itself
    # "mult": MulT pickle, labels (N,1,1) | "mmsa": MMSA pickle, regression_labels (N,)
    flavour: str = "mult"
    # pickle name in the folder; "" = flavour default (mult: mosei_senti_data.pkl, mmsa: aligned_50.pkl)
    file: str = ""

    def check(self) -> None:
        _check_common(self.flavour, self.file)


def _array(split_dict: dict, key: str, source: str) -> np.ndarray:
    if key not in split_dict:
        raise DataError(f"{source}: missing key {key!r}; found keys {sorted(map(str, split_dict))}")
    try:
        return np.asarray(split_dict[key], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: key {key!r} is not a numeric array ({exc})") from exc


def load_sentiment_pickle(
    path: Path, flavour: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a MulT / MMSA pickle into ``{split: {text, audio, vision, target}}`` float tensors.

    Returns:
        (splits, facts): ``splits`` keyed by "train" / "val" / "test"; ``facts`` holds counts worth
        recording (``audio_neg_inf_zeroed`` per split).

    Raises:
        DataError: unreadable file, missing split or key, non-finite features, label out of range.
        ShapeError: arrays that are not (N, L, d), labels of the wrong shape, N or (L, d) that
            differ between modalities or splits.
    """
    require_file(
        path, f"a {flavour} pickle with 'train', 'valid' and 'test' split dicts (see datasets/mosi/README.md)"
    )
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not the expected file"
        raise DataError(f"{path}: cannot be read as a pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: top level is {type(data).__name__}, expected a dict with keys 'train', 'valid', 'test'"
        )
    label_key = "labels" if flavour == "mult" else "regression_labels"
    out: dict[str, dict[str, torch.Tensor]] = {}
    facts: dict[str, Any] = {"audio_neg_inf_zeroed": {}}
    shapes: dict[str, tuple[int, int]] = {}
    for split, key in RELEASE_SPLITS.items():
        if key not in data:
            raise DataError(
                f"{path}: missing split {key!r}; found keys {sorted(map(str, data))}, "
                "expected 'train', 'valid', 'test'"
            )
        part = data[key]
        source = f"{path} [{key!r}]"
        if not isinstance(part, dict):
            raise DataError(f"{source}: is {type(part).__name__}, expected a dict of arrays")
        arrays = {m: _array(part, m, source) for m in MODALITIES}
        n = None
        for m, arr in arrays.items():
            if arr.ndim != 3:
                raise ShapeError(f"{source}[{m!r}]: shape {arr.shape}, expected (N, L, d)")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ShapeError(
                    f"{source}[{m!r}]: {arr.shape[0]} samples, expected {n} like {MODALITIES[0]!r}"
                )
            if m in shapes and shapes[m] != arr.shape[1:]:
                raise ShapeError(
                    f"{source}[{m!r}]: per-sample shape {arr.shape[1:]}, "
                    f"expected {shapes[m]} as in the train split"
                )
            shapes[m] = arr.shape[1:]
        labels = _array(part, label_key, source)
        expected = (n, 1, 1) if flavour == "mult" else (n,)
        if labels.shape != expected and not (flavour == "mmsa" and labels.shape == (n, 1)):
            raise ShapeError(
                f"{source}[{label_key!r}]: shape {labels.shape}, "
                f"expected {expected} for the {flavour!r} flavour"
            )
        labels = labels.reshape(-1)
        bad = ~np.isfinite(labels) | (labels < LABEL_RANGE[0]) | (labels > LABEL_RANGE[1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}[{label_key!r}]: label out of range at sample {i}: {float(labels[i])}; "
                f"expected finite values in [{LABEL_RANGE[0]}, {LABEL_RANGE[1]}] "
                f"({int(bad.sum())} such labels)"
            )
        audio = arrays["audio"]
        neg_inf = audio == -np.inf
        facts["audio_neg_inf_zeroed"][split] = int(neg_inf.sum())
        audio[neg_inf] = 0.0  # as CMUData / MMDataset do
        for m, arr in arrays.items():
            finite = np.isfinite(arr)
            if not finite.all():
                raise DataError(
                    f"{source}[{m!r}]: {int((~finite).sum())} non-finite values (NaN or inf)"
                    + (" after setting -inf to 0" if m == "audio" else "")
                    + "; expected finite features"
                )
        out[split] = {m: torch.from_numpy(np.ascontiguousarray(arr)) for m, arr in arrays.items()}
        out[split]["target"] = torch.from_numpy(np.ascontiguousarray(labels))
    return out, facts


class _SentimentDataset(MultimodalDataset):
    """Shared MOSI / MOSEI loader; subclasses set the defaults."""

    task = "reg"
    modality_names = MODALITIES
    default_model = "mult"
    default_preset = "mosi"
    release: ClassVar[str]
    mult_file: ClassVar[str]
    mmsa_file: ClassVar[str] = "aligned_50.pkl"
    readme: ClassVar[str] = "datasets/mosi/README.md"  # the on-disk layout

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        folder = data_dir(self.name, config.root, config.subdir, self.readme)
        file = config.file or (self.mult_file if config.flavour == "mult" else self.mmsa_file)
        self.path = folder / file
        self._splits, facts = load_sentiment_pickle(self.path, config.flavour)
        train = self._splits["train"]
        self.spec = DatasetSpec(
            task="reg",
            modalities={m: tuple(train[m].shape[1:]) for m in MODALITIES},
            num_outputs=1,
            target_shape=(),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes={
                "release": self.release,
                "flavour": config.flavour,
                "file": file,
                "val_split": "the release's 'valid' split",
                "sizes": {s: int(d["target"].shape[0]) for s, d in self._splits.items()},
                "label_range": list(LABEL_RANGE),
                "audio_neg_inf_zeroed": facts["audio_neg_inf_zeroed"],
            },
        )

    def split(self, split: str) -> Dataset:
        self.check_split_name(split)
        return TensorDictDataset(self._splits[split])

    @classmethod
    def required_files(cls, config: Any, folder: Path) -> list[tuple[Path, str]]:
        file = config.file or (cls.mult_file if config.flavour == "mult" else cls.mmsa_file)
        return [(folder / file, f"the {config.flavour} pickle of {cls.release}")]


@register_dataset("mosi")
class MOSI(_SentimentDataset):
    """CMU-MOSI (Zadeh et al., 2016): 2,199 opinion clips, sentiment in [-3, 3]."""

    Config = MOSIConfig
    paper = "Zadeh et al., MOSI: Multimodal Corpus of Sentiment Intensity (IEEE Intelligent Systems 2016)"
    release = "CMU-MOSI"
    mult_file = "mosi_data.pkl"


@register_dataset("mosei")
class MOSEI(_SentimentDataset):
    """CMU-MOSEI (Zadeh et al., 2018): 23k clips, same pickle formats as MOSI.

    Uses the ``mosi`` training preset by default (same MulT-style model and setup in CGGM).
    """

    Config = MOSEIConfig
    paper = "Zadeh et al., Multimodal Language Analysis in the Wild: CMU-MOSEI (ACL 2018)"
    release = "CMU-MOSEI"
    mult_file = "mosei_senti_data.pkl"
    readme = "datasets/mosei/README.md"
