"""BraTS 2021 loader on the fixture (NIfTI case folders and the h5 layout), malformed files included."""

from __future__ import annotations

import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import check_batch
from mmbalance.datasets.brats2021 import MODALITIES, eval_slice_choice, tumour_slices, zscore_nonzero
from mmbalance.datasets.fixtures import BRATS_FIXTURE_SHAPE, write_fixtures
from mmbalance.errors import ConfigError, DataError, ShapeError

CROP = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx")
    write_fixtures(path, names=["brats2021", "brats2021_h5"])
    return path


@pytest.fixture()
def copy(tmp_path, root):
    shutil.copytree(root / "brats2021", tmp_path / "brats2021")
    return tmp_path


def _build(root, **kw):
    kw.setdefault("crop_size", CROP)
    return DATASETS.build("brats2021", None, root=str(root), **kw)


@pytest.mark.parametrize("subdir,layout", [("brats2021", "nifti"), ("brats2021_h5", "h5")])
def test_layouts_load(root, subdir, layout):
    ds = _build(root, subdir=subdir)
    spec = ds.spec
    assert ds.layout == layout
    assert spec.task == "seg" and spec.num_outputs == 4 and spec.target_shape == (CROP, CROP)
    assert spec.modality_names == MODALITIES and spec.modalities["t1ce"] == (1, CROP, CROP)
    assert spec.default_model == "deeplab" and spec.default_preset == "brats"
    assert spec.notes["cases"] == {"train": 7, "val": 1, "test": 2}
    for split in ("train", "val", "test"):
        data = ds.split(split)
        batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        check_batch(batch, spec)
        assert batch["target"].dtype == torch.int64
        assert set(batch["target"].unique().tolist()) <= {0, 1, 2, 3} and 3 in batch["target"]
        assert (batch["target"] > 0).flatten(1).any(dim=1).all()  # every item shows tumour


def test_both_layouts_hold_the_same_cases_and_slices(root):
    nifti, h5 = _build(root), _build(root, subdir="brats2021_h5")
    assert nifti.cases == h5.cases
    assert nifti.eval_pairs == h5.eval_pairs
    a, b = nifti.split("test")[1], h5.split("test")[1]
    for key in MODALITIES:
        assert torch.allclose(a[key], b[key], atol=1e-5)
    assert torch.equal(a["target"], b["target"])


def test_evaluation_slices_are_fixed(root):
    a, b = _build(root), _build(root)
    assert a.eval_pairs == b.eval_pairs
    torch.manual_seed(0)
    first = a.split("val")[0]
    torch.manual_seed(1)
    again = a.split("val")[0]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert _build(root, eval_seed=1).eval_pairs["test"] != a.eval_pairs["test"]


def test_eval_slice_choice():
    slices = np.arange(3, 12)
    one = eval_slice_choice("BraTS2021_00001", slices, 2, seed=0)
    assert len(one) == 2 and set(one) <= set(slices) and np.all(np.diff(one) > 0)
    assert np.array_equal(one, eval_slice_choice("BraTS2021_00001", slices, 2, seed=0))
    assert np.array_equal(eval_slice_choice("c", slices, 0, seed=0), slices)
    assert np.array_equal(eval_slice_choice("c", slices, 50, seed=0), slices)


def test_all_tumour_slices(root):
    ds = _build(root, eval_slices_per_case=0)
    case = ds.cases["test"][0]
    seg = np.asarray(nib.load(str(root / "brats2021" / case / f"{case}_seg.nii.gz")).dataobj)
    expected = [z for z in range(seg.shape[2]) if seg[:, :, z].any()]
    assert [z for i, z in ds.eval_pairs["test"] if i == 0] == expected


def test_item_is_a_normalised_centre_crop(root):
    ds = _build(root, augment=False)
    i, z = ds.eval_pairs["val"][0]
    case = ds.cases["val"][i]
    case_dir = root / "brats2021" / case
    vols = np.stack([np.asarray(nib.load(str(case_dir / f"{case}_{m}.nii.gz")).dataobj) for m in MODALITIES])
    seg = np.asarray(nib.load(str(case_dir / f"{case}_seg.nii.gz")).dataobj).astype(np.int64)
    seg[seg == 4] = 3
    off = (BRATS_FIXTURE_SHAPE[0] - CROP) // 2
    item = ds.split("val")[0]
    norm = zscore_nonzero(vols.astype(np.float32))
    crop = (slice(off, off + CROP), slice(off, off + CROP), z)
    assert torch.allclose(item["flair"][0], torch.from_numpy(norm[0][crop]), atol=1e-5)
    assert torch.equal(item["target"], torch.from_numpy(seg[crop]))
    raw = _build(root, normalize=False).split("val")[0]
    assert torch.equal(raw["t2"][0], torch.from_numpy(vols[3][crop].astype(np.float32)))


def test_zscore_nonzero():
    vol = np.zeros((1, 4, 1, 1), dtype=np.float32)
    vol[0, :3, 0, 0] = [1.0, 2.0, 3.0]
    out = zscore_nonzero(vol)[0, :, 0, 0]
    assert np.allclose(out, [-1.2247449, 0.0, 1.2247449, 0.0])


def test_augmentation_moves_image_and_label_together(root):
    ds = _build(root, noise_p=0.0)
    data = ds.split("train")
    lab = torch.arange(CROP * CROP).reshape(CROP, CROP)
    img = lab.float().expand(4, CROP, CROP).clone()
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        out_img, out_lab = data._augment(img, lab)
        assert torch.equal(out_img[2], out_lab.float())
        seen.add(tuple(out_lab[0, :2].tolist()))
    # rot90 k in {0,1,2} then a flip of H or W: as in the CGGM RandomRotFlip this gives the four
    # reflections of the square only (rot180 + flip H = flip W), never the identity
    assert len(seen) == 4
    torch.manual_seed(0)
    a = data[0]
    torch.manual_seed(0)
    b = data[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # draws come from torch's seeded RNG


def test_noise_is_applied_with_probability(root):
    data = _build(root, noise_p=1.0, noise_sigma_max=0.5).split("train")
    lab = torch.zeros(CROP, CROP, dtype=torch.long)
    img = torch.zeros(4, CROP, CROP)
    torch.manual_seed(0)
    out, _ = data._augment(img, lab)
    assert out.abs().sum() > 0


def test_nifti_carve_and_split_file(copy):
    ds = _build(copy)
    cases = ds.cases
    assert not set(cases["train"]) & set(cases["val"]) and not set(cases["val"]) & set(cases["test"])
    assert sorted(sum(cases.values(), [])) == [f"BraTS2021_{k:05d}" for k in range(10)]
    assert _build(copy, split_seed=1).cases != cases
    split = {
        "train": [f"BraTS2021_{k:05d}" for k in range(6)],
        "val": ["BraTS2021_00006"],
        "test": ["BraTS2021_00007"],
    }
    (copy / "brats2021" / "splits.json").write_text(json.dumps(split))
    assert _build(copy, split_file="splits.json").cases == split
    split["test"] = ["BraTS2021_00000"]
    (copy / "brats2021" / "splits.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="several splits"):
        _build(copy, split_file="splits.json")


def test_bad_config():
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction must be < 1"):
        DATASETS.build("brats2021", None, root="/x", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="layout must be one of"):
        DATASETS.build("brats2021", None, root="/x", layout="nrrd")
    with pytest.raises(ConfigError, match="--data-root"):
        DATASETS.build("brats2021", None)


def test_crop_larger_than_volume(root):
    with pytest.raises(ShapeError, match=r"smaller in-plane than crop_size=160.*crop_size <= 48"):
        DATASETS.build("brats2021", None, root=str(root))


def test_missing_modality_file(copy):
    (copy / "brats2021" / "BraTS2021_00003" / "BraTS2021_00003_t1ce.nii.gz").unlink()
    missing = r"missing file .*BraTS2021_00003_t1ce\.nii\.gz.*t1ce volume of case BraTS2021_00003"
    with pytest.raises(DataError, match=missing):
        _build(copy)


def test_wrong_volume_shape(copy):
    path = copy / "brats2021" / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 15), dtype=np.int16), np.eye(4)), str(path))
    expected = r"BraTS2021_00002_t2\.nii\.gz: shape \(48, 48, 15\), expected 3-D \(48, 48, 16\)"
    with pytest.raises(ShapeError, match=expected):
        _build(copy)


def test_label_out_of_range(copy):
    ds = _build(copy)
    case = ds.cases["val"][0]
    path = copy / "brats2021" / case / f"{case}_seg.nii.gz"
    seg = np.asarray(nib.load(str(path)).dataobj).copy()
    seg[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(path))
    expected = rf"{case}_seg\.nii\.gz: label out of range: values \[5\]; expected labels in \[0, 1, 2, 4\]"
    with pytest.raises(DataError, match=expected):
        _build(copy)


def test_no_cases(tmp_path):
    (tmp_path / "brats2021" / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match="found neither case folders"):
        _build(tmp_path)


def test_h5_missing_key_and_wrong_shape(tmp_path, root):
    shutil.copytree(root / "brats2021_h5", tmp_path / "brats2021")
    victim = sorted((tmp_path / "brats2021" / "valid").glob("*.h5"))[0]
    with h5py.File(victim, "a") as fh:
        del fh["label"]
    with pytest.raises(DataError, match=rf"{victim.name}: missing key 'label'"):
        _build(tmp_path)
    with h5py.File(victim, "a") as fh:
        fh["label"] = np.zeros((48, 48, 16), dtype=np.uint8)
        image = fh["image"][()]
        del fh["image"]
        fh["image"] = image[:3]
    expected = r"image \(3, 48, 48, 16\) and label \(48, 48, 16\), expected image \(4, H, W, D\)"
    with pytest.raises(ShapeError, match=expected):
        _build(tmp_path)


def test_h5_without_prepare_metadata(tmp_path, root):
    """A CGGM-style h5 file (no tumour_slices, not marked normalised, label 3 for ET) still loads."""
    shutil.copytree(root / "brats2021_h5", tmp_path / "brats2021")
    for path in (tmp_path / "brats2021").glob("*/*.h5"):
        with h5py.File(path, "a") as fh:
            del fh["tumour_slices"]
            del fh.attrs["mmbalance_normalization"]
    ds = _build(tmp_path)
    ref = _build(root, subdir="brats2021_h5")
    assert ds.eval_pairs == ref.eval_pairs
    a, b = ds.split("val")[0], ref.split("val")[0]
    assert torch.allclose(a["flair"], b["flair"], atol=1e-4)  # z-scoring a z-scored volume is a no-op


def _prepare_main():
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "datasets" / "brats2021" / "prepare.py"
    return runpy.run_path(str(script), run_name="prepare")["main"]


def test_prepare_script_converts_with_the_loader_split(tmp_path, root, capsys):
    main = _prepare_main()
    assert main([str(root / "brats2021"), str(tmp_path / "out"), "--split-seed", "1"]) == 0
    assert "wrote 7 train, 1 val, 2 test cases" in capsys.readouterr().out
    nifti = _build(root, split_seed=1)
    h5 = _build(tmp_path, subdir="out")
    assert h5.cases == nifti.cases
    with h5py.File(tmp_path / "out" / "valid" / f"{h5.cases['val'][0]}.h5") as fh:
        assert fh.attrs["mmbalance_normalization"] == "zscore_nonzero"
        assert fh["image"].chunks == (4, 48, 48, 1)
        assert np.array_equal(fh["tumour_slices"][()], tumour_slices(fh["label"][()]))
    assert main([str(root / "brats2021"), str(tmp_path / "bad"), "--val-fraction", "0"]) == 2
    assert "val_fraction must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_conversion_matches_sequential(tmp_path, root):
    main = _prepare_main()
    assert main([str(root / "brats2021"), str(tmp_path / "seq")]) == 0
    assert main([str(root / "brats2021"), str(tmp_path / "par"), "--workers", "2"]) == 0
    for path in (tmp_path / "seq").glob("*/*.h5"):
        with h5py.File(path) as a, h5py.File(tmp_path / "par" / path.parent.name / path.name) as b:
            assert np.array_equal(a["image"][()], b["image"][()])
            assert np.array_equal(a["label"][()], b["label"][()])
