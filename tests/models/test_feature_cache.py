"""Frozen-backbone feature cache (mmbalance/models/feature_cache.py) and ``vit_bert`` cached mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, DataError
from mmbalance.methods.joint import Joint
from mmbalance.models import MODELS
from mmbalance.models.feature_cache import cache_splits, extract_features
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit

SMALL = {
    "vit_depth": 2,
    "vit_dim": 64,
    "vit_heads": 2,
    "image_size": 32,
    "bert_layers": 2,
    "bert_dim": 64,
    "bert_heads": 2,
    "bert_vocab": 100,
    "nlevels": 3,
}
SPEC = DatasetSpec("cls", {"image": (3, 32, 32), "text": (12,)}, 5)


class FoodLike(Dataset):
    """Per-item dict dataset (default collate), like an image/text loader."""

    def __init__(self, n: int, seed: int = 0, augment: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.ids = torch.randint(1, 100, (n, 12), generator=g)
        self.ids[:, 9:] = 0
        self.targets = torch.randint(0, 5, (n,), generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "text": self.ids[i], "target": self.targets[i]}


class Doubler(nn.Module):
    """A counting stand-in extractor: (B, 3, 32, 32) -> (B, 2, 3)."""

    feature_shape = (2, 3)

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 2 * x[:, :2, 0, :3]

    def describe(self) -> dict:
        return {"name": "doubler"}


def _splits(n: int = 10) -> dict[str, Dataset]:
    return {"train": FoodLike(n, 0), "val": FoodLike(4, 1), "test": FoodLike(4, 2)}


def test_cached_features_equal_extractor_outputs_in_order():
    builder = MODELS.build("vit_bert", None, cache_features=True, cache_dtype="float32", **SMALL)
    splits = _splits()
    cached, spec = builder.prepare_splits(splits, SPEC)
    assert dict(spec.modalities) == {"image": (5, 64), "text": (12, 64)}
    assert spec.notes["feature_cache"]["augmentation"] == "off"
    extractors = builder.extractors(12)  # same private seed -> same frozen weights
    train = splits["train"]
    for i in (0, 7):
        item = cached["train"][i]
        assert torch.allclose(item["image"], extractors["image"](train.images[i : i + 1])[0], atol=1e-5)
        assert torch.allclose(item["text"], extractors["text"](train.ids[i : i + 1])[0], atol=1e-5)
        assert item["target"] == train.targets[i]
    batch = cached["val"].__getitems__([3, 0])
    assert batch["image"].shape == (2, 5, 64) and torch.equal(batch["target"], splits["val"].targets[[3, 0]])


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-5), ("float16", 5e-2)])
def test_cached_model_predicts_like_uncached_model(dtype, atol):
    splits = _splits()
    raw_builder = MODELS.build("vit_bert", None, **SMALL)
    builder = MODELS.build("vit_bert", None, cache_features=True, cache_dtype=dtype, **SMALL)
    cached, spec = builder.prepare_splits(splits, SPEC)
    torch.manual_seed(1)
    raw_model = raw_builder(SPEC).eval()
    torch.manual_seed(1)
    cached_model = builder(spec).eval()
    idx = list(range(6))
    raw_batch = {"image": splits["train"].images[idx], "text": splits["train"].ids[idx]}
    with torch.no_grad():
        a = raw_model(raw_batch).prediction
        b = cached_model(cached["train"].__getitems__(idx)).prediction
    assert torch.allclose(a, b, atol=atol)
    assert cached["train"].arrays["image"].dtype == getattr(torch, dtype)


def test_augmenting_split_is_refused():
    builder = MODELS.build("vit_bert", None, cache_features=True, **SMALL)
    splits = dict(_splits(), train=FoodLike(6, augment=True))
    with pytest.raises(ConfigError, match="augment=false"):
        builder.prepare_splits(splits, SPEC)
    recorded = DatasetSpec("cls", dict(SPEC.modalities), 5, notes={"augment": True})  # as the food101 loader
    with pytest.raises(ConfigError, match=r"notes\['augment'\]"):
        builder.prepare_splits(_splits(), recorded)


def test_without_cache_features_prepare_is_identity():
    builder = MODELS.build("vit_bert", None, **SMALL)
    splits = _splits()
    out, spec = builder.prepare_splits(splits, SPEC)
    assert spec is SPEC and all(out[k] is splits[k] for k in splits)


def test_disk_cache_is_reused_validated_and_keyed(tmp_path):
    spec = DatasetSpec("cls", {"image": (3, 32, 32), "text": (12,)}, 5)
    splits = {"train": FoodLike(7), "val": FoodLike(3, 1)}
    first = Doubler()
    out, new_spec = cache_splits(
        splits, {"image": first}, spec, cache_dir=tmp_path, dataset_key="food-a", batch_size=4
    )
    assert first.calls == 3 and dict(new_spec.modalities)["image"] == (2, 3)
    key = new_spec.notes["feature_cache"]["key"]
    assert (tmp_path / key / "train" / "meta.json").is_file()
    assert isinstance(out["train"].arrays["image"], np.memmap)
    again = Doubler()
    out2, _ = cache_splits(splits, {"image": again}, spec, cache_dir=tmp_path, dataset_key="food-a")
    assert again.calls == 0  # reused
    assert torch.equal(
        out2["train"].__getitems__([6, 1])["image"], (2 * splits["train"].images[[6, 1]][:, :2, 0, :3]).half()
    )
    assert torch.equal(out2["train"][2]["text"], splits["train"].ids[2])
    other = Doubler()
    _, spec3 = cache_splits(splits, {"image": other}, spec, cache_dir=tmp_path, dataset_key="food-b")
    assert other.calls > 0 and spec3.notes["feature_cache"]["key"] != key
    # a split whose length changed is not silently reused
    with pytest.raises(DataError, match="holds 7 samples"):
        cache_splits(
            {"train": FoodLike(8)}, {"image": Doubler()}, spec, cache_dir=tmp_path, dataset_key="food-a"
        )
    # a corrupt meta.json is reported with its path
    (tmp_path / key / "val" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json"):
        cache_splits(splits, {"image": Doubler()}, spec, cache_dir=tmp_path, dataset_key="food-a")
    # an interrupted extraction (no meta.json) is redone
    (tmp_path / key / "val" / "meta.json").unlink()
    redo = Doubler()
    cache_splits(splits, {"image": redo}, spec, cache_dir=tmp_path, dataset_key="food-a")
    assert redo.calls == 1 and json.loads((tmp_path / key / "val" / "meta.json").read_text())["n"] == 3
    with pytest.raises(ConfigError, match="dataset_key"):
        cache_splits(splits, {"image": Doubler()}, spec, cache_dir=tmp_path)


def test_extract_rejects_wrong_feature_shape():
    bad = Doubler()
    bad.feature_shape = (3, 3)
    with pytest.raises(Exception, match=r"expected \(3, 3\)"):
        extract_features(FoodLike(2), {"image": bad})


def test_training_runs_on_cached_splits():
    builder = MODELS.build("vit_bert", None, cache_features=True, **SMALL)
    cached, spec = builder.prepare_splits(_splits(), SPEC)
    torch.manual_seed(0)
    model = builder(spec)
    cfg = TrainConfig(epochs=2, batch_size=4, cost_steps=0, deterministic=False)
    result = fit(model, Joint(), cached, spec, make_task("cls", 5), cfg, torch.device("cpu"))
    assert result.steps == 6 and 0.0 <= result.test["acc"] <= 1.0


def test_run_one_with_cache_features_on_food101_fixture(tmp_path):
    """``mmbalance run`` path: run.py calls ``prepare_splits``; a persisted cache is reused."""
    from mmbalance.datasets.fixtures import write_fixtures
    from mmbalance.runner import RunSpec, run_one

    write_fixtures(tmp_path / "data", names=["food101"])
    small = {f"model.{k}": v for k, v in SMALL.items() if k != "image_size"}
    overrides = dict(small, epochs=1, max_train_batches=2, batch_size=4, cost_steps=0)
    cached = dict(overrides, **{"model.cache_features": True, "model.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="augment=false"):
        run_one(RunSpec("joint", "food101", data_root=str(tmp_path / "data"), overrides=cached), device="cpu")
    cached["dataset.augment"] = False
    rows = [
        run_one(RunSpec("joint", "food101", data_root=str(tmp_path / "data"), overrides=cached), device="cpu")
        for _ in range(2)
    ]
    assert rows[0]["status"] == "ok" and rows[0]["metrics"]["test"] == rows[1]["metrics"]["test"]
    note = rows[0]["data_notes"]["feature_cache"]
    assert (
        note["augmentation"] == "off" and (tmp_path / "cache" / note["key"] / "train" / "meta.json").is_file()
    )
