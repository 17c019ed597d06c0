"""Time one training item of the NIfTI layout against the h5 layout written by prepare.py.

Writes 10 synthetic cases of the real BraTS size (240 x 240 x 155, int16, noise-filled; real scans
compress better, so their NIfTI reads are somewhat faster) to a temporary folder, converts them,
and prints the mean time per training item of each layout and the conversion time per case.

    python datasets/brats2021/time_layouts.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mmbalance.datasets import DATASETS
from mmbalance.datasets.brats2021 import MODALITIES
from mmbalance.datasets.brats2021_prepare import convert_nifti_to_h5


def write_cases(folder: Path, n: int = 10, shape: tuple[int, int, int] = (240, 240, 155)) -> None:
    rng = np.random.default_rng(0)
    h, w, d = shape
    yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing="ij")
    brain = (
        ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 + ((zz - d / 2) / (0.45 * d)) ** 2
        <= 1
    )
    r = ((yy - h / 2) / 30) ** 2 + ((xx - w / 2 + 10) / 25) ** 2 + ((zz - d / 2) / 20) ** 2
    seg = np.zeros(shape, np.uint8)
    seg[r <= 1] = 2
    seg[r <= 0.4] = 4
    seg[r <= 0.1] = 1
    for k in range(n):
        case = f"BraTS2021_{k:05d}"
        (folder / case).mkdir(parents=True)
        for m in MODALITIES:
            vol = np.where(brain, 400 + 30 * rng.standard_normal(shape), 0).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / case / f"{case}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(folder / case / f"{case}_seg.nii.gz"))


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cases(root / "brats2021")
        t = time.perf_counter()
        convert_nifti_to_h5(root / "brats2021", root / "brats2021_h5")
        per_case = (time.perf_counter() - t) / 10
        for subdir in ("brats2021", "brats2021_h5"):
            data = DATASETS.build("brats2021", None, root=tmp, subdir=subdir).split("train")
            data[0]  # warm-up
            t = time.perf_counter()
            for i in range(len(data)):
                data[i]
            per_item_ms = 1000 * (time.perf_counter() - t) / len(data)
            print(f"{subdir}: {per_item_ms:.1f} ms per training item ({len(data)} items)")
        print(f"conversion: {per_case:.2f} s per case")


if __name__ == "__main__":
    main()
