"""Conversion of the BraTS 2021 NIfTI release into the per-slice chunked h5 layout (``prepare.py``).

Reading one axial slice from a ``.nii.gz`` volume decompresses the whole volume (five of them per
item). The h5 files written here follow the CGGM layout (``{train,valid,test}/<case>.h5`` with
``image`` (4, H, W, D) and ``label`` (H, W, D)), are chunked per axial slice, hold the sorted
tumour-slice indices and, by default, z-scored volumes marked as such, so the
:mod:`mmbalance.datasets.brats2021` loader reads one slice per item and does not normalise twice.
Used by ``datasets/brats2021/prepare.py`` and by the test fixtures.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mmbalance.datasets.brats2021 import (
    H5_SPLITS,
    MODALITIES,
    NORMALIZED_ATTR,
    NORMALIZED_VALUE,
    BraTS2021Config,
    load_nifti_case,
    nifti_splits,
    tumour_slices,
    zscore_nonzero,
)

__all__ = ["write_h5_case", "convert_case", "convert_nifti_to_h5"]


def write_h5_case(path: Path, image: np.ndarray, label: np.ndarray, *, normalized: bool) -> None:
    """Write one case in the CGGM h5 layout, chunked per axial slice, with ``tumour_slices``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    h, w, d = label.shape
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset(
            "image", data=image.astype(np.float32), chunks=(len(MODALITIES), h, w, 1), compression="lzf"
        )
        fh.create_dataset("label", data=label.astype(np.uint8), chunks=(h, w, 1), compression="lzf")
        fh.create_dataset("tumour_slices", data=tumour_slices(label))
        if normalized:
            fh.attrs[NORMALIZED_ATTR] = NORMALIZED_VALUE
    tmp.replace(path)


def convert_case(src: Path, dst: Path, case: str, split: str, normalize: bool) -> Path:
    """Convert one NIfTI case to ``dst/<split folder>/<case>.h5``; returns the written path."""
    image, label = load_nifti_case(src, case)
    assert image is not None
    if normalize:
        image = zscore_nonzero(image)
    path = dst / H5_SPLITS[split] / f"{case}.h5"
    write_h5_case(path, image, label, normalized=normalize)
    return path


def convert_nifti_to_h5(
    src: Path, dst: Path, config: BraTS2021Config | None = None, *, workers: int = 1, progress: bool = False
) -> dict[str, list[str]]:
    """Convert a NIfTI release folder into the h5 layout (``dst/{train,valid,test}/<case>.h5``).

    The split follows ``config`` (carve or ``split_file``), so the h5 layout holds the same cases in
    the same splits as reading the NIfTI folder directly. Volumes are z-scored (non-zero voxels)
    when ``config.normalize`` and marked so; labels are stored with 4 remapped to 3. ``workers`` > 1
    converts cases in parallel processes.
    """
    src, dst = Path(src), Path(dst)
    config = config or BraTS2021Config(root=str(src), subdir="")
    splits = nifti_splits(src, config)
    jobs = [(split, case) for split, cases in splits.items() for case in cases]
    if workers <= 1:
        for i, (split, case) in enumerate(jobs):
            convert_case(src, dst, case, split, config.normalize)
            if progress:
                print(f"{i + 1}/{len(jobs)} {split} {case}", flush=True)
        return splits
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(convert_case, src, dst, case, split, config.normalize): (split, case)
            for split, case in jobs
        }
        for i, future in enumerate(as_completed(futures)):
            future.result()  # re-raises a worker's DataError / ShapeError
            if progress:
                split, case = futures[future]
                print(f"{i + 1}/{len(jobs)} {split} {case}", flush=True)
    return splits
