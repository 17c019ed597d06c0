"""BraTS 2021 (task 1) as 2D segmentation of axial slices, from NIfTI case folders or CGGM-style h5.

Layouts under ``{root}/{subdir}`` (``layout="auto"`` picks the one present):

* ``"nifti"`` - the public release: one folder per case, ``<case>/<case>_{flair,t1ce,t1,t2,seg}.nii.gz``
  (read with nibabel), labels {0, 1 NCR, 2 ED, 4 ET}. The release ships labels only for its
  training cases, so train / val / test are carved from the case list (sorted ids, seeded:
  ``val_fraction``, ``test_fraction``, ``split_seed``), or read from ``split_file`` (JSON
  ``{"train": [...], "val": [...], "test": [...]}``). Reading a compressed volume costs far more
  than the slice it yields: convert once with ``datasets/brats2021/prepare.py``.
* ``"h5"`` - what ``datasets/BratsDataset.py:BraTSData`` in zrguo/CGGM reads: one ``<case>.h5`` per
  case under ``{train,valid,test}/`` with ``image`` (4, H, W, D) in channel order flair, t1ce, t1, t2
  and ``label`` (H, W, D). Files written by ``prepare.py`` also hold ``tumour_slices`` (sorted axial
  indices with tumour) and are chunked per slice, so one item reads one slice.

Per item (as the CGGM code): an axial slice, labels 4 -> 3 (0 bg, 1 NCR, 2 ED, 3 ET), a centre
crop to ``crop_size`` (offsets ``round((H - crop) / 2)``), and for training (``augment=True``)
``rot90`` by k ~ U{0, 1, 2}, a flip of one in-plane axis (always; the axis is random), and with
p ``noise_p`` Gaussian noise with sigma ~ U(0, ``noise_sigma_max``). Ported as is, rotation then
flip yields one of the four reflections of the square (rot180 + flip H = flip W), never the
identity or a pure rotation; that is the official behaviour, kept for fidelity. Intensities are z-scored per
volume and modality over the non-zero (brain) voxels when ``normalize=True`` (the CGGM h5 files
come preprocessed by an unpublished script; ``prepare.py`` stores z-scored volumes and marks them,
so they are not normalised twice).

Slices. Training draws, per item and epoch, a uniformly random slice among the case's
tumour-containing slices (the CGGM code re-draws ``randint(0, 128)`` until it hits tumour). The
CGGM code does the same at evaluation, which makes its numbers change from run to run; here
validation and test use a FIXED set: for every case, ``eval_slices_per_case`` distinct tumour slices
drawn by a generator seeded with ``(eval_seed, crc32(case id))`` (independent of the run seed and
of the case order), or every tumour slice with ``eval_slices_per_case=0``. Slices without tumour
are never evaluated, as in the CGGM code; a region can still be absent from a slice (e.g. no ET):
the seg metric (``mmbalance.metrics.seg``, CGGM convention) then scores 1 for an empty prediction
and about 0 otherwise, and averages per slice; ``spec.notes["dice"]`` records this with each row. Random draws
use torch's global RNG (seeded by the runner, re-seeded in DataLoader workers).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.config import ConfigBase, need
from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset
from mmbalance.datasets.splits import carve_split, check_fraction, data_dir, read_split_file, require_file
from mmbalance.errors import ConfigError, DataError, ShapeError
from mmbalance.metrics.seg import SegmentationMetrics

__all__ = [
    "BraTS2021",
    "BraTS2021Config",
    "BraTSSplit",
    "MODALITIES",
    "LAYOUTS",
    "find_cases",
    "load_nifti_case",
    "zscore_nonzero",
    "tumour_slices",
    "eval_slice_choice",
    "nifti_splits",
]

MODALITIES = ("flair", "t1ce", "t1", "t2")  # CGGM channel order
LAYOUTS = ("auto", "nifti", "h5")
H5_SPLITS = {"train": "train", "val": "valid", "test": "test"}
NIFTI_LABELS = (0, 1, 2, 4)  # the public release
H5_LABELS = (0, 1, 2, 3, 4)  # CGGM h5 files store 4 already remapped to 3 (the loader remaps again)
NORMALIZED_ATTR = "mmbalance_normalization"  # set by prepare.py on z-scored volumes
NORMALIZED_VALUE = "zscore_nonzero"


@dataclass(frozen=True)
class BraTS2021Config(ConfigBase):
    root: str = ""  # data root (--data-root); files are read from root/subdir
    subdir: str = "brats2021"  # folder under root; "" reads root itself
    layout: str = "auto"  # "auto" | "nifti" (case folders of .nii.gz) | "h5" ({train,valid,test}/<case>.h5)
    crop_size: int = 160  # centre crop of each axial slice (CGGM 160x160)
    augment: bool = True  # train only: rot90 k in {0,1,2}, flip of one in-plane axis, Gaussian noise
    noise_p: float = 0.1  # probability of Gaussian noise (CGGM GaussianNoise(p=0.1))
    noise_sigma_max: float = 0.1  # noise sigma ~ U(0, noise_sigma_max)
    normalize: bool = True  # z-score each modality per volume over its non-zero voxels
    val_fraction: float = 0.1  # nifti: part of the cases carved as validation
    test_fraction: float = 0.2  # nifti: part of the cases carved as test
    split_seed: int = 0  # nifti: seed of the case carve
    split_file: str = ""  # nifti: JSON {"train","val","test": [case ids]} in the folder; overrides the carve
    eval_slices_per_case: int = 1  # fixed tumour slices per val/test case; 0 = every tumour slice
    eval_seed: int = 0  # seed of the fixed evaluation slices
    case_glob: str = "BraTS2021_*"  # nifti: case folder pattern

    def check(self) -> None:
        need(self, self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}")
        need(self, self.crop_size >= 8, "crop_size", "an integer >= 8")
        need(self, 0 <= self.noise_p <= 1, "noise_p", "in [0, 1]")
        need(self, self.noise_sigma_max >= 0, "noise_sigma_max", ">= 0")
        check_fraction("val_fraction", self.val_fraction)
        check_fraction("test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}"
            )
        need(self, self.eval_slices_per_case >= 0, "eval_slices_per_case", "an integer >= 0")
        for name in ("split_seed", "eval_seed"):
            need(self, getattr(self, name) >= 0, name, "an integer >= 0")


# -- volumes ---------------------------------------------------------------------------------------
def zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the non-zero voxels of ``volume`` (C, ...); zero voxels stay 0."""
    return _apply_stats(volume, *_channel_stats(volume))


def _check_labels(label: np.ndarray, allowed: tuple[int, ...], source: str) -> None:
    values = np.unique(label)
    bad = [int(v) for v in values if int(v) not in allowed or v != int(v)]
    if bad:
        raise DataError(f"{source}: label out of range: values {bad}; expected labels in {list(allowed)}")


def tumour_slices(label: np.ndarray) -> np.ndarray:
    """Sorted axial indices (last axis) whose label slice contains tumour (any label > 0)."""
    return np.flatnonzero((label > 0).reshape(-1, label.shape[-1]).any(axis=0)).astype(np.int64)


def find_cases(folder: Path, case_glob: str) -> list[str]:
    """Sorted case ids (folder names matching ``case_glob``) of a NIfTI release folder."""
    return sorted(p.name for p in folder.glob(case_glob) if p.is_dir())


def _nifti_paths(folder: Path, case: str) -> dict[str, Path]:
    paths = {m: folder / case / f"{case}_{m}.nii.gz" for m in (*MODALITIES, "seg")}
    for m, p in paths.items():
        require_file(p, f"the {m} volume of case {case} (<case>/<case>_{{flair,t1ce,t1,t2,seg}}.nii.gz)")
    return paths


def _nifti_shapes(folder: Path, case: str) -> tuple[int, int, int]:
    import nibabel as nib

    shapes = {}
    for m, p in _nifti_paths(folder, case).items():
        try:
            shapes[m] = tuple(nib.load(str(p)).shape)
        except Exception as exc:  # nibabel raises several types for corrupt headers
            raise DataError(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    ref = shapes["seg"]
    for m, s in shapes.items():
        if len(s) != 3 or s != ref:
            path = folder / case / f"{case}_{m}.nii.gz"
            raise ShapeError(f"{path}: shape {s}, expected 3-D {ref} like the seg volume")
    return ref  # type: ignore[return-value]


def load_nifti_case(
    folder: Path, case: str, *, labels_only: bool = False
) -> tuple[np.ndarray | None, np.ndarray]:
    """``(image (4, H, W, D) float32 raw, label (H, W, D) int64 with 4 -> 3)`` of one NIfTI case."""
    import nibabel as nib

    paths = _nifti_paths(folder, case)

    def read(p: Path) -> np.ndarray:
        try:
            return np.asarray(nib.load(str(p)).dataobj)
        except Exception as exc:  # corrupt gzip / header
            raise DataError(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc

    seg = read(paths["seg"])
    if seg.ndim != 3:
        raise ShapeError(f"{paths['seg']}: shape {seg.shape}, expected (H, W, D)")
    _check_labels(seg, NIFTI_LABELS, str(paths["seg"]))
    label = seg.astype(np.int64)
    label[label == 4] = 3
    if labels_only:
        return None, label
    vols = []
    for m in MODALITIES:
        vol = read(paths[m])
        if vol.shape != seg.shape:
            raise ShapeError(f"{paths[m]}: shape {vol.shape}, expected {seg.shape} like the seg volume")
        vols.append(vol.astype(np.float32))
    return np.stack(vols), label


def nifti_splits(folder: Path, config: BraTS2021Config) -> dict[str, list[str]]:
    """Case ids per split for the NIfTI layout: ``split_file`` if given, else the seeded carve."""
    cases = find_cases(folder, config.case_glob)
    if not cases:
        raise DataError(
            f"{folder}: no case folders matching {config.case_glob!r}; "
            "expected <case>/<case>_<modality>.nii.gz"
        )
    if config.split_file:
        expected = 'JSON {"train": [...], "val": [...], "test": [...]} of case ids'
        path = require_file(folder / config.split_file, expected)
        return read_split_file(path, cases, f"the case folders of {folder}")
    fractions = {"val": config.val_fraction, "test": config.test_fraction}
    carve = carve_split(len(cases), fractions, config.split_seed)
    return {s: [cases[i] for i in carve[s]] for s in ("train", "val", "test")}


def eval_slice_choice(case: str, slices: np.ndarray, per_case: int, seed: int) -> np.ndarray:
    """The fixed evaluation slices of one case: ``per_case`` distinct tumour slices (all when 0)."""
    if per_case == 0 or per_case >= len(slices):
        return slices
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(case.encode("utf-8"))]))
    return np.sort(rng.choice(slices, size=per_case, replace=False))


# -- h5 ------------------------------------------------------------------------------------------
def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot be opened as HDF5 ({exc})") from exc


def _h5_meta(path: Path) -> tuple[tuple[int, int, int], bool]:
    with _open_h5(path) as fh:
        for key in ("image", "label"):
            if key not in fh:
                raise DataError(
                    f"{path}: missing key {key!r}; expected 'image' (4, H, W, D) and 'label' (H, W, D)"
                )
        img, lab = fh["image"].shape, fh["label"].shape
        if len(img) != 4 or img[0] != len(MODALITIES) or len(lab) != 3 or tuple(img[1:]) != tuple(lab):
            raise ShapeError(
                f"{path}: image {img} and label {lab}, expected image (4, H, W, D) in order {MODALITIES} "
                "and label (H, W, D)"
            )
        return tuple(lab), fh.attrs.get(NORMALIZED_ATTR) == NORMALIZED_VALUE  # type: ignore[return-value]


def _h5_tumour_slices(path: Path) -> np.ndarray:
    with _open_h5(path) as fh:
        if "tumour_slices" in fh:
            return np.asarray(fh["tumour_slices"][()], dtype=np.int64)
        label = np.asarray(fh["label"][()])
    _check_labels(label, H5_LABELS, f"{path}['label']")
    return tumour_slices(label)


# -- the dataset -----------------------------------------------------------------------------------
class BraTSSplit(Dataset):
    """Items ``{flair, t1ce, t1, t2: float32 (1, c, c), "target": int64 (c, c)}``, c = crop_size.

    Training (``slices is None``): one item per case, a random tumour slice per draw. Evaluation:
    one item per fixed ``(case, slice)`` pair.
    """

    def __init__(
        self,
        owner: BraTS2021,
        cases: list[str],
        pairs: list[tuple[int, int]] | None,
        train: bool,
    ) -> None:
        self.owner = owner
        self.cases = cases
        self.pairs = pairs
        self.train = train
        self.cfg: BraTS2021Config = owner.config
        self._tumour: dict[int, np.ndarray] = {}
        self._stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases) if self.pairs is None else len(self.pairs)

    def _slice(self, case_index: int, z: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(image (4, H, W) float32, label (H, W) int64 with 4 -> 3); z=None draws a tumour slice."""
        owner, case = self.owner, self.cases[case_index]
        if owner.layout == "nifti":
            image, label = load_nifti_case(owner.folder, case)
            assert image is not None
            if z is None:
                z = self._draw(tumour_slices(label), case)
            img = image[..., z]
            if self.cfg.normalize:
                img = _apply_stats(img, *_channel_stats(image))
            return img, label[..., z]
        path = owner.h5_path(case)
        if z is None:
            if case_index not in self._tumour:
                self._tumour[case_index] = _h5_tumour_slices(path)
            z = self._draw(self._tumour[case_index], case)
        with _open_h5(path) as fh:
            image = np.asarray(fh["image"][:, :, :, z], dtype=np.float32)
            label = np.asarray(fh["label"][:, :, z])
            if self.cfg.normalize and not owner.h5_normalized[case]:
                if case_index not in self._stats:
                    self._stats[case_index] = _channel_stats(np.asarray(fh["image"][()], dtype=np.float32))
                image = _apply_stats(image, *self._stats[case_index])
        _check_labels(label, H5_LABELS, f"{path}['label'][:, :, {z}]")
        label = label.astype(np.int64)
        label[label == 4] = 3
        return image, label

    @staticmethod
    def _draw(slices: np.ndarray, case: str) -> int:
        if len(slices) == 0:
            raise DataError(f"case {case!r} has no slice with tumour; expected at least one labelled slice")
        return int(slices[int(torch.randint(len(slices), ()))])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.pairs is None:
            case_index, z = index, None
        else:
            case_index, z = self.pairs[index]
        image, label = self._slice(case_index, z)
        c = self.cfg.crop_size
        h, w = label.shape
        if h < c or w < c:
            raise ShapeError(
                f"case {self.cases[case_index]!r}: slice {h}x{w} is smaller than crop_size={c}; "
                f"expected a slice of at least {c}x{c} (set crop_size <= {min(h, w)})"
            )
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        img = torch.from_numpy(np.ascontiguousarray(image[:, top : top + c, left : left + c]))
        lab = torch.from_numpy(np.ascontiguousarray(label[top : top + c, left : left + c]))
        if self.train and self.cfg.augment:
            img, lab = self._augment(img, lab)
        item = {m: img[i : i + 1].contiguous() for i, m in enumerate(MODALITIES)}
        item["target"] = lab.contiguous()
        return item

    def _augment(self, img: Tensor, lab: Tensor) -> tuple[Tensor, Tensor]:
        """CGGM RandomRotFlip + GaussianNoise: rot90 by k in {0,1,2}, flip H or W, noise w.p. noise_p."""
        k = int(torch.randint(3, ()))
        img, lab = torch.rot90(img, k, dims=(1, 2)), torch.rot90(lab, k, dims=(0, 1))
        axis = int(torch.randint(2, ()))  # 0: flip H, 1: flip W
        img, lab = torch.flip(img, dims=(1 + axis,)), torch.flip(lab, dims=(axis,))
        if float(torch.rand(())) < self.cfg.noise_p:
            sigma = float(torch.rand(())) * self.cfg.noise_sigma_max
            img = img + sigma * torch.randn_like(img)
        return img, lab


def _apply_stats(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """z-score ``image`` (C, ...) with per-channel statistics (of its volume); zero voxels stay 0."""
    shape = (-1,) + (1,) * (image.ndim - 1)
    scaled = (image - mean.reshape(shape)) / std.reshape(shape)
    return np.where(image != 0, scaled, 0).astype(np.float32)


def _channel_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the non-zero voxels of ``image`` (C, ...); std 0 -> 1."""
    means, stds = [], []
    for chan in image:
        vals = chan[chan != 0].astype(np.float64)
        mean = vals.mean() if vals.size else 0.0
        std = vals.std() if vals.size else 1.0
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return np.asarray(means, dtype=np.float32), np.asarray(stds, dtype=np.float32)


@register_dataset("brats2021")
class BraTS2021(MultimodalDataset):
    """BraTS 2021 glioma segmentation, four MRI modalities, random axial slices."""

    Config = BraTS2021Config
    paper = "Baid et al., The RSNA-ASNR-MICCAI BraTS 2021 Benchmark (arXiv 2107.02314)"
    task = "seg"
    modality_names = MODALITIES
    default_model = "deeplab"
    default_preset = "brats"

    def __init__(self, config: BraTS2021Config) -> None:
        super().__init__(config)
        folder = data_dir("brats2021", config.root, config.subdir, "datasets/brats2021/README.md")
        self.folder = folder
        self.layout = self._detect(folder) if config.layout == "auto" else config.layout
        self.h5_normalized: dict[str, bool] = {}
        self._h5_paths: dict[str, Path] = {}
        if self.layout == "nifti":
            self.cases = nifti_splits(folder, config)
            shapes = {c: _nifti_shapes(folder, c) for cases in self.cases.values() for c in cases}
            split_source = (
                f"split_file {config.split_file}"
                if config.split_file
                else f"cases carved: val_fraction={config.val_fraction}, "
                f"test_fraction={config.test_fraction}, split_seed={config.split_seed}"
            )
        else:
            self.cases = {}
            shapes = {}
            for split, sub in H5_SPLITS.items():
                d = folder / sub
                files = sorted(d.glob("*.h5")) if d.is_dir() else []
                if not files:
                    raise DataError(
                        f"{d}: no <case>.h5 files; expected {{train,valid,test}}/<case>.h5 (h5 layout)"
                    )
                self.cases[split] = [p.stem for p in files]
                for p in files:
                    if p.stem in self._h5_paths:
                        first = self._h5_paths[p.stem].parent
                        raise DataError(
                            f"case {p.stem!r} is in both {first} and {d}; expected disjoint splits"
                        )
                    self._h5_paths[p.stem] = p
                    shapes[p.stem], self.h5_normalized[p.stem] = _h5_meta(p)
            split_source = "the folders train/, valid/, test/"
        c = config.crop_size
        small = [(case, s) for case, s in shapes.items() if s[0] < c or s[1] < c]
        if small:
            case, s = small[0]
            raise ShapeError(
                f"case {case!r}: volume {s} is smaller in-plane than crop_size={c}; "
                f"expected at least {c}x{c} (set crop_size <= {min(s[0], s[1])})"
            )
        self.eval_pairs = {s: self._eval_pairs(s) for s in ("val", "test")}
        self.spec = DatasetSpec(
            task="seg",
            modalities={m: (1, c, c) for m in MODALITIES},
            num_outputs=4,
            target_shape=(c, c),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes={
                "release": "BraTS 2021 task 1",
                "layout": self.layout,
                "splits": split_source,
                "cases": {s: len(v) for s, v in self.cases.items()},
                "labels": "0 background, 1 NCR, 2 ED, 3 ET (4 remapped to 3); ET={3}, TC={1,3}, WT={1,2,3}",
                "train_slices": "one uniformly random tumour-containing axial slice per case and epoch",
                "eval_slices": (
                    "every tumour-containing axial slice"
                    if config.eval_slices_per_case == 0
                    else f"{config.eval_slices_per_case} fixed tumour slice(s) per case, "
                    f"seed (eval_seed={config.eval_seed}, crc32(case id))"
                ),
                "eval_items": {s: len(p) for s, p in self.eval_pairs.items()},
                "crop": f"centre {c}x{c}",
                "normalize": (
                    "z-score per volume and modality over non-zero voxels" if config.normalize else "none"
                ),
                "dice": (
                    "per slice and region (ET, TC, WT) on hard label maps, smoothed with "
                    f"eps={SegmentationMetrics().eps:g} (a region absent from both prediction and ground "
                    "truth scores 1), averaged over the fixed eval slices; CGGM convention, "
                    "mmbalance.metrics.seg"
                ),
            },
        )

    @staticmethod
    def _detect(folder: Path) -> str:
        has_h5 = all((folder / s).is_dir() and any((folder / s).glob("*.h5")) for s in H5_SPLITS.values())
        has_nifti = any(p.is_dir() and any(p.glob("*_seg.nii.gz")) for p in folder.iterdir())
        if has_h5 and has_nifti:
            raise ConfigError(
                f"{folder} holds both NIfTI case folders and {{train,valid,test}}/*.h5; "
                "set layout='nifti' or 'h5'"
            )
        if not (has_h5 or has_nifti):
            raise DataError(
                f"{folder}: found neither case folders with <case>_seg.nii.gz (nifti layout) nor "
                "train/, valid/, test/ folders of .h5 files (h5 layout); see datasets/brats2021/README.md"
            )
        return "h5" if has_h5 else "nifti"

    def h5_path(self, case: str) -> Path:
        """Where case ``case`` lives in the h5 layout."""
        return self._h5_paths[case]

    def _eval_pairs(self, split: str) -> list[tuple[int, int]]:
        pairs = []
        for i, case in enumerate(self.cases[split]):
            if self.layout == "nifti":
                _, label = load_nifti_case(self.folder, case, labels_only=True)
                slices = tumour_slices(label)
            else:
                slices = _h5_tumour_slices(self.h5_path(case))
            if len(slices) == 0:
                raise DataError(
                    f"case {case!r} ({split}) has no slice with tumour; expected at least one labelled slice"
                )
            chosen = eval_slice_choice(case, slices, self.config.eval_slices_per_case, self.config.eval_seed)
            pairs.extend((i, int(z)) for z in chosen)
        return pairs

    def split(self, split: str) -> Dataset:
        self.check_split_name(split)
        if split == "train":
            return BraTSSplit(self, self.cases["train"], None, train=True)
        return BraTSSplit(self, self.cases[split], self.eval_pairs[split], train=False)
