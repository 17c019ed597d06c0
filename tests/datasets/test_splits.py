"""Seeded split carving and data-folder helpers (mmbalance.datasets.splits)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmbalance.datasets.splits import (
    as_str_list,
    carve_split,
    check_fraction,
    data_dir,
    read_split_file,
    split_sizes,
)
from mmbalance.errors import ConfigError, DataError


def test_carve_partitions_and_sizes():
    parts = carve_split(100, {"val": 0.1, "test": 0.2}, seed=0)
    assert [len(parts[k]) for k in ("val", "test", "train")] == [10, 20, 70]
    joined = np.concatenate([parts["val"], parts["test"], parts["train"]])
    assert sorted(joined.tolist()) == list(range(100))
    for idx in parts.values():
        assert np.all(np.diff(idx) > 0)  # sorted, no duplicates


def test_carve_is_a_function_of_the_seed():
    a = carve_split(50, {"val": 0.2}, seed=3)
    b = carve_split(50, {"val": 0.2}, seed=3)
    c = carve_split(50, {"val": 0.2}, seed=4)
    assert np.array_equal(a["val"], b["val"])
    assert not np.array_equal(a["val"], c["val"])


def test_carve_pins_the_pcg64_stream():
    # The exact indices are part of the recorded protocol: a change here changes every val split.
    assert carve_split(10, {"val": 0.3}, seed=0)["val"].tolist() == sorted(
        np.random.Generator(np.random.PCG64(0)).permutation(10)[:3].tolist()
    )


def test_tiny_parts_get_one_sample_and_overfull_carves_raise():
    assert split_sizes(5, {"val": 0.01}) == {"val": 1}
    with pytest.raises(ConfigError, match="leaving 0 for training"):
        carve_split(2, {"val": 0.5, "test": 0.4}, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        carve_split(1, {"val": 0.5}, seed=0)
    with pytest.raises(ConfigError, match="remainder"):
        carve_split(10, {"train": 0.5}, seed=0)


def test_check_fraction_names_the_field():
    check_fraction("val_fraction", 0.5)
    check_fraction("f", 0.0, allow_zero=True)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        check_fraction("val_fraction", 1.0)
    with pytest.raises(ValueError, match="got 0"):
        check_fraction("val_fraction", 0)


def test_data_dir(tmp_path):
    (tmp_path / "mosi").mkdir()
    assert data_dir("mosi", str(tmp_path), "mosi", "README") == tmp_path / "mosi"
    assert data_dir("mosi", str(tmp_path), "", "README") == tmp_path
    with pytest.raises(ConfigError, match="--data-root"):
        data_dir("mosi", "", "mosi", "README")
    with pytest.raises(DataError, match="does not exist"):
        data_dir("mosi", str(tmp_path), "nope", "README")


def test_as_str_list_decodes_mmin_ids():
    ids = np.array([[b"Ses01F_a"], [b"Ses01F_b"]])
    assert as_str_list(list(ids), "x") == ["Ses01F_a", "Ses01F_b"]
    assert as_str_list(["a", b"b"], "x") == ["a", "b"]
    with pytest.raises(DataError, match="entry 0"):
        as_str_list([3], "x")


@pytest.mark.parametrize(
    "listed, message",
    [
        ({"train": ["a"], "val": ["b"]}, "missing key 'test'"),
        ({"train": ["a"], "val": "b", "test": ["c"]}, "missing key 'val'"),
        (["a", "b", "c"], "missing key 'train'"),
        ({"train": ["a"], "val": ["b"], "test": ["z"]}, "id 'z' of split 'test' is not among the cases"),
        ({"train": ["a"], "val": ["b"], "test": ["b", "c"]}, "ids in several splits, e.g. 'b'"),
    ],
)
def test_read_split_file_rejects_bad_lists(tmp_path, listed, message):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(listed))
    with pytest.raises(DataError, match=message):
        read_split_file(path, ["a", "b", "c", "d"], "the cases")


def test_read_split_file_sorts_each_split(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["d", "a"], "val": ["c"], "test": ["b"]}))
    assert read_split_file(path, ("a", "b", "c", "d"), "the cases") == {
        "train": ["a", "d"],
        "val": ["c"],
        "test": ["b"],
    }
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_split_file(path, ("a",), "the cases")
