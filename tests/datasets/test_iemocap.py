"""IEMOCAP loader on the MMIN-layout fixture (h5 + npy), malformed files included."""

from __future__ import annotations

import pickle
import shutil

import h5py
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
    write_fixtures(path, names=["iemocap"])
    return path


@pytest.fixture()
def copy(tmp_path, root):
    shutil.copytree(root / "iemocap", tmp_path / "iemocap")
    return tmp_path


def _ids(folder, fold, tag):
    return [x[0].decode() for x in np.load(folder / "target" / str(fold) / f"{tag}_int2name.npy")]


def test_spec_and_batches(root):
    ds = DATASETS.build("iemocap", None, root=str(root))
    spec = ds.spec
    assert spec.task == "cls" and spec.num_outputs == 4 and spec.target_shape == ()
    assert dict(spec.modalities) == {"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)}
    assert spec.default_model == "mult" and spec.default_preset == "iemocap"
    assert spec.notes["sizes"] == {"train": 16, "val": 8, "test": 8} and spec.notes["fold"] == 1
    for split in ("train", "val", "test"):
        data = ds.split(split)
        batch = torch.utils.data.default_collate([data[i] for i in range(4)])
        check_batch(batch, spec)
        assert batch["target"].dtype == torch.int64


def test_item_is_normalised_then_zero_padded(root):
    folder = root / "iemocap"
    ds = DATASETS.build("iemocap", None, root=str(root))
    name = _ids(folder, 1, "val")[2]
    label = np.load(folder / "target" / "1" / "val_label.npy")[2].argmax()
    item = ds.split("val")[2]
    with h5py.File(folder / "A" / "comparE.h5") as fa, h5py.File(folder / "L" / "bert_large.h5") as fl:
        audio, text = fa[name][()], fl[name][()]
    # the fixture's mean/std file holds mean 5, std 3 for fold 1
    assert torch.allclose(item["audio"][: len(audio)], torch.from_numpy((audio - 5.0) / 3.0), atol=1e-5)
    assert torch.count_nonzero(item["audio"][len(audio):]) == 0
    assert torch.equal(item["text"][: len(text)], torch.from_numpy(text))
    assert torch.count_nonzero(item["text"][len(text):]) == 0
    assert int(item["target"]) == label


def test_utterance_normalisation_and_in_memory(root):
    lazy = DATASETS.build("iemocap", None, root=str(root), audio_norm="utt")
    mem = DATASETS.build("iemocap", None, root=str(root), audio_norm="utt", in_memory=True)
    a, b = lazy.split("train")[5], mem.split("train")[5]
    for key in a:
        assert torch.equal(a[key], b[key])
    n = int((a["audio"].abs().sum(dim=1) > 0).sum())
    assert torch.allclose(a["audio"][:n].mean(dim=0), torch.zeros(130), atol=1e-4)


def test_folds_are_selectable(root):
    folder = root / "iemocap"
    one = DATASETS.build("iemocap", None, root=str(root), fold=1).split("train")
    two = DATASETS.build("iemocap", None, root=str(root), fold=2).split("train")
    assert one.names == _ids(folder, 1, "trn") and two.names == _ids(folder, 2, "trn")
    assert one.names != two.names


def test_split_pickles_for_workers(root):
    data = DATASETS.build("iemocap", None, root=str(root)).split("test")
    _ = data[0]  # opens the h5 handles
    clone = pickle.loads(pickle.dumps(data))
    assert torch.equal(clone[1]["vision"], data[1]["vision"])


def test_bad_config():
    with pytest.raises(ConfigError, match="fold must be an integer >= 1, got 0"):
        DATASETS.build("iemocap", None, root="/x", fold=0)
    with pytest.raises(ConfigError, match="audio_norm must be one of"):
        DATASETS.build("iemocap", None, root="/x", audio_norm="global")


def test_missing_fold_lists_the_folds(root):
    with pytest.raises(DataError, match=r"fold 3: .* \(folds found: \['1', '2'\]\)"):
        DATASETS.build("iemocap", None, root=str(root), fold=3)


def test_missing_feature_file(copy):
    (copy / "iemocap" / "V" / "denseface.h5").unlink()
    with pytest.raises(DataError, match=r"missing file .*denseface\.h5"):
        DATASETS.build("iemocap", None, root=str(copy))


def test_missing_mean_std(copy):
    (copy / "iemocap" / "A" / "comparE_mean_std.h5").unlink()
    with pytest.raises(DataError, match="comparE_mean_std.h5"):
        DATASETS.build("iemocap", None, root=str(copy))
    DATASETS.build("iemocap", None, root=str(copy), audio_norm="none")  # not needed without "trn"


def test_missing_utterance(copy):
    name = _ids(copy / "iemocap", 1, "tst")[0]
    with h5py.File(copy / "iemocap" / "L" / "bert_large.h5", "a") as fh:
        del fh[name]
    expected = rf"bert_large\.h5: missing utterance '{name}' listed in the test split"
    with pytest.raises(DataError, match=expected):
        DATASETS.build("iemocap", None, root=str(copy))


def test_wrong_feature_shape(copy):
    name = _ids(copy / "iemocap", 1, "trn")[0]
    with h5py.File(copy / "iemocap" / "V" / "denseface.h5", "a") as fh:
        del fh[name]
        fh[name] = np.zeros((4, 341), dtype=np.float32)
    with pytest.raises(ShapeError, match=rf"denseface\.h5\['{name}'\]: feature dim 341, expected 342"):
        DATASETS.build("iemocap", None, root=str(copy))


def test_too_long_utterance(copy):
    name = _ids(copy / "iemocap", 1, "val")[1]
    with h5py.File(copy / "iemocap" / "L" / "bert_large.h5", "a") as fh:
        del fh[name]
        fh[name] = np.zeros((23, 1024), dtype=np.float32)
    with pytest.raises(DataError, match="text length 23 exceeds text_max_len=22"):
        DATASETS.build("iemocap", None, root=str(copy))
    longer = DATASETS.build("iemocap", None, root=str(copy), text_max_len=23)
    assert longer.spec.modalities["text"] == (23, 1024)


def test_label_out_of_range(copy):
    path = copy / "iemocap" / "target" / "1" / "val_label.npy"
    labels = np.load(path)
    labels[4] = [0, 2, 0, 0]
    np.save(path, labels)
    expected = r"val_label\.npy: label out of range at row 4: \[0\.0, 2\.0, 0\.0, 0\.0\]"
    with pytest.raises(DataError, match=expected):
        DATASETS.build("iemocap", None, root=str(copy))


def test_label_and_id_counts_differ(copy):
    path = copy / "iemocap" / "target" / "1" / "trn_int2name.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(ShapeError, match="15 ids, expected 16"):
        DATASETS.build("iemocap", None, root=str(copy))
