"""The fixture writer: every paper dataset in its on-disk format, readable by its loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import check_batch
from mmbalance.datasets.fixtures import FIXTURE_NAMES, write_fixtures
from mmbalance.errors import ConfigError

# fixture -> (dataset name, config overrides beyond --data-root)
LOADERS = {
    "food101": ("food101", {"image_size": 32}),
    "food101_cggm": ("food101", {"subdir": "food101_cggm", "image_size": 32}),
    "mosi": ("mosi", {}),
    "mosei": ("mosei", {}),
    "iemocap": ("iemocap", {}),
    "brats2021": ("brats2021", {"crop_size": 32}),
    "brats2021_h5": ("brats2021", {"subdir": "brats2021_h5", "crop_size": 32}),
}
EXPECTED_FILES = {
    "food101": ["texts/train_titles.csv", "texts/test_titles.csv", "images/train/pizza/pizza_train_0.jpg",
                "bert_tokenizer/vocab.txt", "bert_tokens_public_train.npz"],
    "food101_cggm": ["train.json", "test.json", "images/test/sushi/sushi_test_1.jpg",
                     "bert_tokens_cggm_json_test.npz"],
    "mosi": ["mosi_data.pkl", "aligned_50.pkl"],
    "mosei": ["mosei_senti_data.pkl", "aligned_50.pkl"],
    "iemocap": ["A/comparE.h5", "A/comparE_mean_std.h5", "V/denseface.h5", "L/bert_large.h5",
                "target/1/trn_label.npy", "target/2/tst_int2name.npy"],
    "brats2021": ["BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
                  "BraTS2021_00009/BraTS2021_00009_seg.nii.gz"],
    "brats2021_h5": ["train", "valid", "test"],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    return root, write_fixtures(root)


def test_every_fixture_is_written(written):
    root, paths = written
    assert tuple(paths) == FIXTURE_NAMES
    for name, files in EXPECTED_FILES.items():
        assert paths[name] == root / name
        for rel in files:
            assert (root / name / rel).exists(), f"{name}: {rel} missing"


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_every_fixture_loads(written, fixture):
    root, _ = written
    name, overrides = LOADERS[fixture]
    ds = DATASETS.build(name, None, root=str(root), **overrides)
    for split in ("train", "val", "test"):
        data = ds.split(split)
        if hasattr(data, "__getitems__"):
            batch = data.__getitems__([0, 1])
        else:
            batch = torch.utils.data.default_collate([data[i] for i in range(min(2, len(data)))])
        check_batch(batch, ds.spec, source=f"{fixture}/{split}")


def test_every_paper_dataset_has_a_fixture():
    assert {name for name, _ in LOADERS.values()} == set(DATASETS.names()) - {
        n for n in DATASETS.names() if n.startswith("synthetic")
    }


def test_deterministic_and_subsets_match(written, tmp_path):
    root, _ = written
    write_fixtures(tmp_path, names=["mosi", "iemocap"])
    pickle = "mosi/mosi_data.pkl"
    assert (tmp_path / pickle).read_bytes() == (root / pickle).read_bytes()
    a = np.load(tmp_path / "iemocap" / "target" / "2" / "val_label.npy")
    assert np.array_equal(a, np.load(root / "iemocap" / "target" / "2" / "val_label.npy"))
    assert not (tmp_path / "food101").exists()


def test_unknown_fixture_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown fixture 'cremad'"):
        write_fixtures(tmp_path, names=["cremad"])


def test_cli_fixtures_subcommand(tmp_path, capsys):
    from mmbalance.cli import main

    assert main(["fixtures", str(tmp_path), "--only", "mosi", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"mosi           {tmp_path / 'mosi'}" in out and "--data-root" in out
    assert (tmp_path / "mosi" / "mosi_data.pkl").is_file() and not (tmp_path / "iemocap").exists()
