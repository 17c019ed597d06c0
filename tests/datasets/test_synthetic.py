"""Synthetic datasets: registry metadata, split shapes, determinism, validation, and the documented
generative process (each claim of the module docstring that a cheap statistic can check)."""

from __future__ import annotations

import pytest
import torch

from mmbalance.datasets import DATASETS, check_batch
from mmbalance.datasets.base import TensorDictDataset
from mmbalance.datasets.synthetic import SyntheticCls2
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.models import MODELS
from mmbalance.presets import TRAIN_PRESETS

NAMES = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")
TINY = {"n_train": 24, "n_val": 8, "n_test": 12}


def build(name: str, **overrides):
    return DATASETS.build(name, None, **{**TINY, **overrides})


@pytest.mark.parametrize("name", NAMES)
def test_splits_match_spec(name):
    ds = build(name)
    spec = ds.spec
    assert type(ds).task == spec.task
    assert type(ds).modality_names == spec.modality_names
    assert spec.default_model in MODELS
    assert spec.default_preset == "synthetic" and "synthetic" in TRAIN_PRESETS
    assert spec.notes["weak_modality"] in spec.modalities
    assert spec.notes["strong_modality"] in spec.modalities
    for split, n in (("train", 24), ("val", 8), ("test", 12)):
        data = ds.split(split)
        assert isinstance(data, TensorDictDataset) and len(data) == n
        batch = data.__getitems__(list(range(5)))
        check_batch(batch, spec, source=f"{name}/{split}")
        for m in spec.modalities:
            assert batch[m].dtype == torch.float32
            assert torch.isfinite(batch[m]).all()
        target = batch["target"]
        if spec.task in ("cls", "seg"):
            assert target.dtype == torch.long
            assert 0 <= int(target.min()) and int(target.max()) < spec.num_outputs
        else:
            assert target.dtype == torch.float32
            assert float(target.abs().max()) <= 3.0


def test_registry_filters():
    assert {"synthetic_cls2", "synthetic_cls3"} <= set(DATASETS.names(task="cls"))
    assert "synthetic_reg3" in DATASETS.names(task="reg", modalities=3)
    assert "synthetic_seg4" in DATASETS.names(task="seg", modalities=4)
    assert "synthetic_cls2" not in DATASETS.names(modalities=3)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_and_private_rng(name):
    state = torch.random.get_rng_state()
    a, b, c = build(name, seed=3), build(name, seed=3), build(name, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state), "generation must not touch the global RNG"
    for split in ("train", "val", "test"):
        ta, tb, tc = a.split(split).tensors, b.split(split).tensors, c.split(split).tensors
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}/{split}/{key} differs for the same seed"
        m = a.spec.modality_names[0]
        assert not torch.equal(ta[m], tc[m]), f"{name}/{split}/{m} identical for different seeds"


def test_splits_are_disjoint_draws():
    ds = build("synthetic_cls2")
    train, test = ds.split("train").tensors["weak"], ds.split("test").tensors["weak"]
    assert not any(torch.equal(train[i], test[j]) for i in range(len(train)) for j in range(len(test)))


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("synthetic_cls2", {"n_train": 0}, "n_train"),
        ("synthetic_cls2", {"weak_dim": 5}, "weak_dim"),
        ("synthetic_cls2", {"fine_classes": 1}, "fine_classes"),
        ("synthetic_cls3", {"redundant_noise": 0.0}, "redundant_noise"),
        ("synthetic_reg3", {"text_weight": 3.5}, "text_weight"),
        ("synthetic_reg3", {"audio_dim": 2}, "audio_dim"),
        ("synthetic_seg4", {"size": 8}, "size"),
        ("synthetic_seg4", {"noise": -1.0}, "noise"),
    ],
)
def test_bad_config_names_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=field):
        build(name, **overrides)


def test_unknown_key_and_split():
    with pytest.raises(MMBalanceError, match="strong_signl"):
        build("synthetic_cls2", strong_signl=1.0)
    with pytest.raises(ConfigError, match="split must be one of"):
        build("synthetic_cls2").split("validation")
    with pytest.raises(ConfigError, match="Cls2Config"):
        SyntheticCls2(object())


# -- the generative process as documented ---------------------------------------------------------
def _class_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([x[labels == i].mean(dim=0) for i in range(k)])


def test_cls2_strong_shows_coarse_only_weak_not_linear():
    ds = DATASETS.build("synthetic_cls2", None, n_train=6000, n_val=1, n_test=1)
    c = ds.config
    data = ds.split("train").tensors
    y = data["target"]
    coarse = y // c.fine_classes
    means = _class_means(data["strong"], y, c.num_classes).view(c.coarse_classes, c.fine_classes, -1)
    # the strong view is the same for both fine labels of a coarse class, and differs across coarse classes
    assert (means[:, 0] - means[:, 1]).norm(dim=1).max() < 0.3
    coarse_means = _class_means(data["strong"], coarse, c.coarse_classes)
    assert torch.cdist(coarse_means, coarse_means).add(torch.eye(c.coarse_classes) * 1e3).min() > 2.0
    # the weak view's class-conditional mean is zero (random sign), but its energy is class-dependent
    assert _class_means(data["weak"], y, c.num_classes).norm(dim=1).max() < 0.4
    second = torch.stack([data["weak"][y == k].T.cov(correction=0) for k in range(c.num_classes)])
    assert (torch.linalg.eigvalsh(second)[:, -2:] > 1 + 0.5 * c.weak_signal**2).all(), "two label directions"
    pairwise = (second[:, None] - second[None]).flatten(2).norm(dim=2) + torch.eye(c.num_classes) * 1e3
    assert pairwise.min() > 0.5 * c.weak_signal**2 * 2**0.5, "every class has its own second moment"


def test_cls3_redundant_is_coarse_only():
    ds = DATASETS.build("synthetic_cls3", None, n_train=6000, n_val=1, n_test=1)
    c = ds.config
    data = ds.split("train").tensors
    means = _class_means(data["redundant"], data["target"], c.num_classes).view(
        c.coarse_classes, c.fine_classes, -1
    )
    assert (means[:, 0] - means[:, 1]).norm(dim=1).max() < 0.3
    assert list(ds.spec.modalities) == ["strong", "weak", "redundant"]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_reg3_text_linear_audio_not():
    ds = DATASETS.build("synthetic_reg3", None, n_train=4000, n_val=1, n_test=1)
    data = ds.split("train").tensors
    y = data["target"]
    assert float(y.min()) >= -3.0 and float(y.max()) <= 3.0 and float(y.std()) > 0.8
    text_best = max(abs(_corr(data["text"].mean(dim=1)[:, j], y)) for j in range(data["text"].shape[2]))
    audio_best = max(abs(_corr(data["audio"].mean(dim=1)[:, j], y)) for j in range(data["audio"].shape[2]))
    assert text_best > 0.5, "text's time mean must be linearly informative"
    assert audio_best < 0.1, "audio's time mean must carry no linear evidence (random per-step sign)"


def test_seg4_labels_and_modalities():
    ds = DATASETS.build("synthetic_seg4", None, n_train=200, n_val=1, n_test=1)
    c = ds.config
    data = ds.split("train").tensors
    label = data["target"]
    assert ((label > 0).flatten(1).any(dim=1)).all(), "every image contains a tumour"
    assert ((label == 3).flatten(1).any(dim=1)).float().mean() > 0.9, "nearly every image has an ET ring"
    flair, t1ce = data["flair"][:, 0], data["t1ce"][:, 0]
    bg, ed, et, ncr = label == 0, label == 2, label == 3, label == 1
    assert abs(float(flair[ed].mean() - flair[bg].mean()) - c.flair_contrast) < 0.2
    assert abs(float(flair[et].mean() - flair[ed].mean())) < 0.2, "flair is uniform inside the tumour"
    assert float(t1ce[et].mean() - t1ce[bg].mean()) > 0.8 * c.t1ce_et_contrast
    assert float(t1ce[bg].mean() - t1ce[ncr].mean()) > 0.5 * c.t1ce_ncr_contrast
    assert abs(float(t1ce[ed].mean() - t1ce[bg].mean())) < 0.15, "edema in t1ce is zero-mean texture"
    assert float(t1ce[ed].var()) > float(t1ce[bg].var()) + 0.5 * c.t1ce_ed_texture**2
