"""Small models: shapes on every synthetic dataset, gradient flow, disjoint modality groups,
seeded determinism, and the errors for specs a builder cannot serve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import seed_everything

NAMES = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")


def dataset_and_batch(name: str, batch_size: int = 4):
    ds = DATASETS.build(name, None, n_train=8, n_val=2, n_test=2)
    return ds.spec, ds.split("train").__getitems__(list(range(batch_size)))


def build(spec: DatasetSpec, name: str | None = None, seed: int = 0, **overrides):
    seed_everything(seed, deterministic=False)
    return MODELS.build(name or spec.default_model, None, **overrides)(spec)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_shapes(name):
    spec, batch = dataset_and_batch(name)
    model = build(spec)
    out = model(batch)
    b = 4
    expected = {"cls": (b, spec.num_outputs), "reg": (b, 1), "seg": (b, 4, *spec.target_shape)}[spec.task]
    assert tuple(out.prediction.shape) == expected
    for m, shape in spec.modalities.items():
        feature = out.features[m]
        assert torch.equal(feature, model.encoders[m](batch[m])), "features[m] must be the encoder output"
        if len(shape) == 1:
            assert feature.dim() == 2 and feature.shape[0] == b
        elif len(shape) == 2:  # sequences keep their time axis
            assert tuple(feature.shape[:2]) == (b, shape[0]) and feature.dim() == 3
        else:
            assert tuple(feature.shape[:2]) == (b, model.encoders[m].net[0].out_channels)
            assert tuple(feature.shape[2:]) == tuple((s + 1) // 2 for s in shape[1:])
    assert out.head_input is not None
    in_size = model.out_layer.in_channels if spec.task == "seg" else model.out_layer.in_features
    assert out.head_input.shape[1] == in_size
    if spec.task == "seg":
        assert isinstance(model.out_layer, nn.Conv2d) and model.out_layer.kernel_size == (1, 1)
    else:
        assert isinstance(model.out_layer, nn.Linear)
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    task.loss(out.prediction, batch["target"]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert any(float(p.grad.abs().sum()) > 0 for p in model.modality_parameters(spec.notes["weak_modality"]))


@pytest.mark.parametrize("name", NAMES)
def test_modality_parameters_disjoint_and_complete(name):
    spec, _ = dataset_and_batch(name)
    model = build(spec)
    groups = {m: {id(p) for p in model.modality_parameters(m)} for m in spec.modalities}
    assert all(groups.values()), "every modality group must be non-empty"
    seen: set[int] = set()
    for m, ids in groups.items():
        assert not (ids & seen), f"modality {m!r} shares parameters with another modality"
        seen |= ids
    shared = {id(p) for p in model.shared_parameters()}
    assert not (shared & seen)
    assert seen | shared == {id(p) for p in model.parameters()}
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()), (
        "no running stats"
    )


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name):
    spec, batch = dataset_and_batch(name)
    a, b, c = build(spec, seed=1), build(spec, seed=1), build(spec, seed=2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a(batch).prediction, b(batch).prediction)
    assert not torch.equal(a(batch).prediction, c(batch).prediction)


def test_drop_zeroes_a_modality_without_state_change():
    spec, batch = dataset_and_batch("synthetic_seg4")
    model = build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full, dropped = model(batch), model(batch, drop=("t1ce",))
    assert not torch.equal(full.prediction, dropped.prediction)
    assert torch.equal(full.features["t1ce"], dropped.features["t1ce"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_transformer_accepts_vectors_and_variable_length():
    spec = DatasetSpec(
        task="cls", modalities={"seq": (-1, 5), "vec": (7,)}, num_outputs=3, default_model="small_transformer"
    )
    model = build(spec, max_len=16)
    batch = {"seq": torch.randn(2, 11, 5), "vec": torch.randn(2, 7)}
    out = model(batch)
    assert tuple(out.prediction.shape) == (2, 3)
    assert tuple(out.features["seq"].shape) == (2, 11, 32) and tuple(out.features["vec"].shape) == (2, 32)
    with pytest.raises(ShapeError, match="max_len"):
        model({"seq": torch.randn(2, 17, 5), "vec": torch.randn(2, 7)})


def test_wrong_input_shape_names_the_expected_one():
    spec, batch = dataset_and_batch("synthetic_cls2")
    model = build(spec)
    with pytest.raises(ShapeError, match=r"\(B, 32\)"):
        model({**batch, "weak": torch.randn(4, 31)})


@pytest.mark.parametrize(
    ("builder", "spec", "match"),
    [
        ("small_mlp", DatasetSpec(task="reg", modalities={"t": (8, 4)}, num_outputs=1), "vector modalities"),
        (
            "small_mlp",
            DatasetSpec(task="seg", modalities={"a": (1, 16, 16)}, num_outputs=4, target_shape=(16, 16)),
            "tasks",
        ),
        (
            "small_transformer",
            DatasetSpec(task="cls", modalities={"i": (1, 8, 8)}, num_outputs=2),
            "sequence",
        ),
        ("small_seg", DatasetSpec(task="cls", modalities={"a": (4,)}, num_outputs=2), "tasks"),
        (
            "small_seg",
            DatasetSpec(task="seg", modalities={"a": (1, 16, 8)}, num_outputs=4, target_shape=(16, 16)),
            "matching",
        ),
    ],
)
def test_unsupported_specs(builder, spec, match):
    with pytest.raises(UnsupportedError, match=match):
        MODELS.build(builder)(spec)


@pytest.mark.parametrize(
    ("builder", "overrides", "field"),
    [
        ("small_mlp", {"hidden": 0}, "hidden"),
        ("small_mlp", {"dropout": 1.0}, "dropout"),
        ("small_transformer", {"d_model": 30, "heads": 4}, "d_model"),
        ("small_seg", {"channels": -1}, "channels"),
    ],
)
def test_bad_config_names_the_field(builder, overrides, field):
    with pytest.raises(ConfigError, match=field):
        MODELS.build(builder, None, **overrides)


def test_registry_capabilities():
    assert {"small_mlp", "small_transformer"} <= set(MODELS.names(task="cls"))
    assert "small_seg" in MODELS.names(task="seg") and "small_seg" not in MODELS.names(task="reg")
