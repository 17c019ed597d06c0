"""Convert the BraTS 2021 NIfTI release into the h5 layout that mmbalance (and the CGGM code) reads.

Reading one axial slice from a ``.nii.gz`` volume decompresses the whole volume (five of them per
item); the h5 files written here are chunked per slice, hold the sorted tumour-slice indices and
store z-scored volumes, so an item reads only its slice.

    python datasets/brats2021/prepare.py DATA/brats2021 DATA/brats2021_h5 --workers 8
    mmbalance run joint brats2021 --data-root DATA --set dataset.subdir=brats2021_h5

The cases go to train / valid / test exactly as the ``brats2021`` loader splits the NIfTI folder
with the same options (``--val-fraction``, ``--test-fraction``, ``--split-seed`` or
``--split-file``), so both layouts give the same splits. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmbalance.datasets.brats2021 import BraTS2021Config
from mmbalance.datasets.brats2021_prepare import convert_nifti_to_h5
from mmbalance.errors import MMBalanceError


def main(argv: list[str] | None = None) -> int:
    defaults = BraTS2021Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src", type=Path, help="folder of case folders BraTS2021_XXXXX/BraTS2021_XXXXX_<modality>.nii.gz"
    )
    parser.add_argument("dst", type=Path, help="output folder; receives train/, valid/, test/ of <case>.h5")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed)
    parser.add_argument(
        "--split-file", default="", help='JSON {"train","val","test": [case ids]}, relative to SRC'
    )
    parser.add_argument("--case-glob", default=defaults.case_glob)
    parser.add_argument("--no-normalize", action="store_true", help="store raw intensities (not z-scored)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = BraTS2021Config(
            root=str(args.src),
            subdir="",
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            split_file=args.split_file,
            case_glob=args.case_glob,
            normalize=not args.no_normalize,
        )
        splits = convert_nifti_to_h5(args.src, args.dst, config, workers=args.workers, progress=True)
    except (MMBalanceError, ValueError) as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(cases)} {split}" for split, cases in splits.items())
    print(f"wrote {counts} cases to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
