"""UPMC Food-101 loader on the fixture (public and CGGM JSON layouts), malformed files included."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import check_batch
from mmbalance.datasets.fixtures import write_fixtures
from mmbalance.datasets.food101 import CLASS_NAMES, read_token_cache, token_cache_path
from mmbalance.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx")
    write_fixtures(path, names=["food101", "food101_cggm"])
    return path


@pytest.fixture()
def copy(tmp_path, root):
    shutil.copytree(root / "food101", tmp_path / "food101")
    shutil.copytree(root / "food101_cggm", tmp_path / "food101_cggm")
    return tmp_path


def _build(root, **kw):
    kw.setdefault("image_size", 32)
    return DATASETS.build("food101", None, root=str(root), **kw)


@pytest.mark.parametrize("subdir,layout", [("food101", "public"), ("food101_cggm", "cggm_json")])
def test_layouts_load(root, subdir, layout):
    ds = _build(root, subdir=subdir)
    spec = ds.spec
    assert ds.layout == layout and spec.notes["layout"] == layout
    assert spec.task == "cls" and spec.num_outputs == 101 and spec.target_shape == ()
    assert dict(spec.modalities) == {"image": (3, 32, 32), "text": (50,)}
    assert spec.default_model == "vit_bert" and spec.default_preset == "food101"
    assert spec.notes["sizes"] == {"train": 16, "val": 2, "test": 6}
    for split in ("train", "val", "test"):
        data = ds.split(split)
        batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        check_batch(batch, spec)
        assert batch["image"].dtype == torch.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert batch["text"].dtype == torch.int64
        assert (batch["text"][:, 0] == 2).all()  # [CLS] of the fixture vocabulary
        assert (batch["text"][:, -1] == 0).all()  # short titles: padded with id 0
        classes = {CLASS_NAMES.index(c) for c in ("apple_pie", "pizza", "sushi")}
        assert set(batch["target"].tolist()) <= classes


def test_full_size_default(root):
    item = DATASETS.build("food101", None, root=str(root)).split("test")[0]
    assert item["image"].shape == (3, 224, 224)


def test_labels_follow_the_official_class_list(root):
    ds = _build(root)
    data = ds.split("test")
    with open(root / "food101" / "texts" / "test_titles.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert [CLASS_NAMES[int(t)] for t in data.labels] == [r[2] for r in rows]
    assert CLASS_NAMES.index("apple_pie") == 0 and CLASS_NAMES.index("waffles") == 100


def test_tokenizer_path_matches_the_token_cache(root):
    tok = str(root / "food101" / "bert_tokenizer")
    cached = _build(root).split("train")
    direct = _build(root, tokenizer_path=tok).split("train")
    assert torch.equal(cached.ids, direct.ids)
    assert _build(root, tokenizer_path=tok).spec.notes["tokens_from"] == "tokenizer_path"


def test_validation_carve_is_seeded_and_disjoint(root):
    a, b, c = _build(root), _build(root), _build(root, split_seed=5)
    val = lambda ds: sorted(ds.split("val").images)  # noqa: E731
    assert val(a) == val(b) and val(a) != val(c)
    assert not set(a.split("val").images) & set(a.split("train").images)
    assert all("images/test/" in p for p in a.split("test").images)
    assert a.spec.notes["val_split"].startswith("carved from train") and a.spec.notes["split_seed"] == 0


def test_dev_json_is_the_validation_split(copy):
    folder = copy / "food101_cggm"
    train = json.loads((folder / "train.json").read_text())
    (folder / "dev.json").write_text(json.dumps(train[:3]))
    (folder / "train.json").write_text(json.dumps(train[3:]))
    ds = _build(copy, subdir="food101_cggm", tokenizer_path=str(folder / "bert_tokenizer"))
    assert ds.spec.notes["val_split"] == "dev.json" and ds.spec.notes["sizes"]["val"] == 3


def test_augmentation_only_for_train_and_switchable(root):
    ds = _build(root)
    torch.manual_seed(0)
    a = ds.split("train")[0]["image"]
    torch.manual_seed(1)
    b = ds.split("train")[0]["image"]
    assert not torch.equal(a, b)
    assert torch.equal(ds.split("val")[0]["image"], ds.split("val")[0]["image"])
    plain = _build(root, augment=False)
    assert torch.equal(plain.split("train")[0]["image"], plain.split("train")[0]["image"])


def test_bad_config():
    with pytest.raises(ConfigError, match="layout must be one of"):
        DATASETS.build("food101", None, root="/x", layout="csv")
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        DATASETS.build("food101", None, root="/x", val_fraction=1.5)


def test_both_layouts_need_an_explicit_choice(copy):
    shutil.copy(copy / "food101_cggm" / "train.json", copy / "food101" / "train.json")
    with pytest.raises(ConfigError, match="set layout="):
        _build(copy)
    assert _build(copy, layout="public").layout == "public"


def test_no_layout(tmp_path):
    (tmp_path / "food101").mkdir()
    with pytest.raises(DataError, match="found neither train.json"):
        _build(tmp_path)


def test_no_tokenizer_and_no_cache(copy):
    token_cache_path(copy / "food101", "public", "test").unlink()
    with pytest.raises(DataError, match=r"no token cache .*prepare\.py"):
        _build(copy)


def test_stale_token_cache(copy):
    with pytest.raises(Exception, match="max_length"):
        _build(copy, max_length=40)
    folder = copy / "food101"
    with open(folder / "texts" / "train_titles.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["pizza_extra.jpg", "pizza", "pizza"])
    pizza = folder / "images" / "train" / "pizza"
    shutil.copy(pizza / "pizza_train_0.jpg", pizza / "pizza_extra.jpg")
    with pytest.raises(DataError, match=r"1 of 19 samples are not in the token cache.*pizza_extra"):
        _build(copy)


def test_label_out_of_range(copy):
    with open(copy / "food101" / "texts" / "test_titles.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["x.jpg", "a title", "spaghetti_napoli"])
    expected = r"test_titles\.csv row 7: label out of range: class 'spaghetti_napoli'"
    with pytest.raises(DataError, match=expected):
        _build(copy)


def test_malformed_csv_row(copy):
    with open(copy / "food101" / "texts" / "train_titles.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["x.jpg", "pizza"])
    with pytest.raises(DataError, match=r"train_titles\.csv row 19: 2 fields, expected 3"):
        _build(copy)


def test_json_entry_missing_key(copy):
    path = copy / "food101_cggm" / "test.json"
    entries = json.loads(path.read_text())
    del entries[1]["img_path"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"test\.json entry 1: missing key 'img_path'"):
        _build(copy, subdir="food101_cggm")


def test_json_text_tokens_must_be_a_list(copy):
    path = copy / "food101_cggm" / "train.json"
    entries = json.loads(path.read_text())
    entries[0]["text_tokens"] = "apple pie"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="'text_tokens' is str, expected a list"):
        _build(copy, subdir="food101_cggm")


def test_missing_image_file(copy):
    missing = copy / "food101" / "images" / "train" / "sushi" / "sushi_train_3.jpg"
    missing.unlink()
    with pytest.raises(DataError, match=r"missing image file .*sushi_train_3\.jpg.*1 of 18"):
        _build(copy)
    ds = _build(copy, on_missing_image="drop")
    assert ds.spec.notes["dropped_missing_images"] == {"train": 1, "test": 0}
    assert sum(ds.spec.notes["sizes"][s] for s in ("train", "val")) == 17


def test_corrupt_image(copy):
    (copy / "food101" / "images" / "test" / "pizza" / "pizza_test_0.jpg").write_bytes(b"not a jpeg")
    data = _build(copy).split("test")
    index = data.images.index("images/test/pizza/pizza_test_0.jpg")
    with pytest.raises(DataError, match="cannot be decoded as an image"):
        data[index]


def test_tokenizer_path_must_exist(root):
    with pytest.raises(ConfigError, match="tokenizer_path '/nope' is not a folder"):
        _build(root, tokenizer_path="/nope")


def test_read_token_cache_reorders_by_key(root):
    from mmbalance.datasets.food101 import read_records

    folder = root / "food101"
    records = read_records(folder, "public", "test")
    ids = read_token_cache(folder, "public", "test", records, 50)
    rev = read_token_cache(folder, "public", "test", records[::-1], 50)
    assert np.array_equal(ids[::-1], rev)


def test_prepare_script_writes_the_token_cache(copy, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "datasets" / "food101" / "prepare.py"
    main = runpy.run_path(str(script), run_name="prepare")["main"]
    folder = copy / "food101"
    for split in ("train", "test"):
        token_cache_path(folder, "public", split).unlink()
    assert main([str(folder), "--tokenizer", str(folder / "bert_tokenizer")]) == 0
    assert "bert_tokens_public_test.npz" in capsys.readouterr().out
    assert _build(copy).spec.notes["tokens_from"] == "prepare.py token cache"
    assert main([str(folder), "--tokenizer", str(folder / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
