"""CMU-MOSI / MOSEI loaders on the fixture pickles (MulT and MMSA flavours), malformed files included."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import check_batch
from mmbalance.datasets.fixtures import write_fixtures
from mmbalance.errors import ConfigError, DataError, ShapeError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx")
    write_fixtures(path, names=["mosi", "mosei"])
    return path


def _pickle(path):
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _broken(tmp_path, root, edit, file="mosi_data.pkl"):
    """A copy of the MOSI fixture folder whose pickle ``file`` was changed by ``edit(data)``."""
    folder = tmp_path / "mosi"
    shutil.copytree(root / "mosi", folder)
    data = _pickle(folder / file)
    edit(data)
    with open(folder / file, "wb") as fh:
        pickle.dump(data, fh)
    return tmp_path


@pytest.mark.parametrize(
    "name,flavour", [("mosi", "mult"), ("mosi", "mmsa"), ("mosei", "mult"), ("mosei", "mmsa")]
)
def test_loads_fixture(root, name, flavour):
    ds = DATASETS.build(name, None, root=str(root), flavour=flavour)
    spec = ds.spec
    assert spec.task == "reg" and spec.num_outputs == 1 and spec.target_shape == ()
    assert spec.modality_names == ("text", "audio", "vision")
    assert spec.default_model == "mult" and spec.default_preset == "mosi"
    assert spec.notes["sizes"] == {"train": 16, "val": 8, "test": 8}
    text_dim = 300 if flavour == "mult" else 768
    assert spec.modalities["text"][1] == text_dim
    for split in ("train", "val", "test"):
        data = ds.split(split)
        batch = data.__getitems__(list(range(len(data))))
        check_batch(batch, spec)
        assert batch["target"].dtype == torch.float32
        assert all(torch.isfinite(batch[m]).all() for m in spec.modalities)


def test_values_match_the_pickle_and_neg_inf_becomes_zero(root):
    raw = _pickle(root / "mosi" / "mosi_data.pkl")
    ds = DATASETS.build("mosi", None, root=str(root))
    test = ds.split("test").tensors
    assert torch.equal(test["target"], torch.from_numpy(raw["test"]["labels"].reshape(-1)))
    assert torch.equal(test["text"], torch.from_numpy(raw["test"]["text"]))
    audio = raw["train"]["audio"].copy()
    assert np.isneginf(audio).sum() == 2
    audio[np.isneginf(audio)] = 0
    assert torch.equal(ds.split("train").tensors["audio"], torch.from_numpy(audio))
    assert ds.spec.notes["audio_neg_inf_zeroed"]["train"] == 2


def test_registry_metadata():
    assert {"mosi", "mosei"} <= set(DATASETS.names(task="reg", modalities=3))
    assert "mosi" not in DATASETS.names(task="cls")


def test_bad_config():
    with pytest.raises(ConfigError, match="flavour must be one of"):
        DATASETS.build("mosi", None, root="/x", flavour="raw")
    with pytest.raises(ConfigError, match="--data-root"):
        DATASETS.build("mosi", None)


def test_missing_folder_and_file(tmp_path, root):
    with pytest.raises(DataError, match="does not exist"):
        DATASETS.build("mosi", None, root=str(tmp_path))
    with pytest.raises(DataError, match=r"missing file .*unaligned_50.pkl"):
        DATASETS.build("mosi", None, root=str(root), flavour="mmsa", file="unaligned_50.pkl")


def test_not_a_pickle(tmp_path):
    (tmp_path / "mosi").mkdir()
    (tmp_path / "mosi" / "mosi_data.pkl").write_text("not a pickle")
    with pytest.raises(DataError, match="cannot be read as a pickle"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_missing_split(tmp_path, root):
    _broken(tmp_path, root, lambda d: d.pop("valid"))
    with pytest.raises(DataError, match=r"missing split 'valid'"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_missing_key_names_file_split_and_key(tmp_path, root):
    _broken(tmp_path, root, lambda d: d["test"].pop("vision"))
    with pytest.raises(DataError, match=r"mosi_data\.pkl \['test'\]: missing key 'vision'"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_mmsa_needs_regression_labels(tmp_path, root):
    _broken(tmp_path, root, lambda d: d["train"].pop("regression_labels"), file="aligned_50.pkl")
    with pytest.raises(DataError, match="missing key 'regression_labels'"):
        DATASETS.build("mosi", None, root=str(tmp_path), flavour="mmsa")


def test_wrong_label_shape(tmp_path, root):
    def edit(d):
        d["train"]["labels"] = d["train"]["labels"].reshape(-1)

    _broken(tmp_path, root, edit)
    with pytest.raises(ShapeError, match=r"\['labels'\]: shape \(16,\), expected \(16, 1, 1\)"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_wrong_feature_shape(tmp_path, root):
    def edit(d):
        d["valid"]["audio"] = d["valid"]["audio"][:, :, :3]

    _broken(tmp_path, root, edit)
    with pytest.raises(ShapeError, match=r"\['audio'\]: per-sample shape \(12, 3\), expected \(12, 5\)"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_sample_count_mismatch(tmp_path, root):
    def edit(d):
        d["train"]["vision"] = d["train"]["vision"][:-1]

    _broken(tmp_path, root, edit)
    with pytest.raises(ShapeError, match="15 samples, expected 16"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_label_out_of_range(tmp_path, root):
    def edit(d):
        d["test"]["labels"][3, 0, 0] = 4.5

    _broken(tmp_path, root, edit)
    with pytest.raises(DataError, match=r"label out of range at sample 3: 4\.5.*\[-3\.0, 3\.0\]"):
        DATASETS.build("mosi", None, root=str(tmp_path))


def test_nan_feature(tmp_path, root):
    def edit(d):
        d["train"]["vision"][0, 0, 0] = np.nan

    _broken(tmp_path, root, edit)
    with pytest.raises(DataError, match=r"\['vision'\]: 1 non-finite values"):
        DATASETS.build("mosi", None, root=str(tmp_path))
