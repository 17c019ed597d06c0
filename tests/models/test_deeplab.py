"""``deeplab``: per-modality ResNet + ASPP encoders, shared DeepLabv3+ decoder
(mmbalance/models/deeplab.py)."""

from __future__ import annotations

import pytest
import torch

from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import MODELS

MODS = ("flair", "t1ce", "t1", "t2")
SMALL = {"backbone": "resnet18", "multi_grid": (1, 2)}


def _spec(size: int = 64, shape: tuple[int, ...] | None = None) -> DatasetSpec:
    shape = shape or (1, size, size)
    return DatasetSpec("seg", {m: shape for m in MODS}, 4, target_shape=(size, size))


def _batch(size: int = 64, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {m: torch.randn(batch, 1, size, size, generator=g) for m in MODS}


def _check_groups(model) -> None:
    groups = {m: {id(p) for p in model.modality_parameters(m)} for m in MODS}
    assert all(groups.values())
    for i, a in enumerate(MODS):
        for b in MODS[i + 1 :]:
            assert not groups[a] & groups[b]
    shared = {id(p) for p in model.shared_parameters()}
    assert not shared & set().union(*groups.values())


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return MODELS.build("deeplab", None, **SMALL)(_spec())


def test_reduced_forward_backward_shapes(small_model):
    model = small_model.train()
    model.zero_grad()
    out = model(_batch())
    assert out.prediction.shape == (2, 4, 64, 64)
    assert out.head_input.shape == (2, 256, 64, 64)  # full resolution: out_layer is the last op
    for m in MODS:
        assert out.features[m].shape == (2, 256 + 64, 16, 16)  # upsampled ASPP + resnet18 layer1
        assert torch.equal(out.extras[f"{m}.low"], out.features[m][:, 256:])
    assert isinstance(model.out_layer, torch.nn.Conv2d) and model.out_layer.kernel_size == (1, 1)
    out.prediction.square().mean().backward()
    _check_groups(model)
    assert all(p.grad is not None for p in model.parameters())


def test_prediction_is_head_of_fusion_of_features(small_model):
    # the contract methods rely on (copies of fusion + head, masked passes)
    model = small_model.eval()
    with torch.no_grad():
        out = model(_batch())
        again, hidden = model.head(model.fusion(out.features))
    assert torch.equal(again, out.prediction) and torch.equal(hidden, out.head_input)


def test_upsampling_before_out_layer_equals_official_order(small_model):
    # official: logits = out_layer(h) at 1/4 resolution, then bilinear upsampling to the input size
    model = small_model.eval()
    body = model.head.body
    with torch.no_grad():
        fused = model.fusion(model.encode(_batch())[0])
        low_res = body[:-1](fused)
        official = torch.nn.functional.interpolate(
            model.out_layer(low_res), size=(64, 64), mode="bilinear", align_corners=True
        )
        ours = model.out_layer(body(fused))
    assert torch.allclose(ours, official, atol=1e-4 * official.abs().max().item())


def test_dropped_modality_has_no_influence(small_model):
    # drop zeroes the modality's ASPP and low-level parts (official: missing input -> both zero)
    model = small_model.eval()
    batch = _batch()
    other = dict(batch, t1=torch.randn(2, 1, 64, 64))
    with torch.no_grad():
        a = model(batch, drop=("t1",)).prediction
        b = model(other, drop=("t1",)).prediction
        full = model(batch).prediction
    assert torch.equal(a, b)
    assert not torch.allclose(a, full, atol=1e-3)


def test_multi_grid_dilations_like_official():
    # official _make_MG_unit at output stride 16: layer4 blocks dilated 2 * (1, 2, 4)
    spec = DatasetSpec("seg", {"flair": (32, 32)}, 4, target_shape=(32, 32))
    model = MODELS.build("deeplab", None, backbone="resnet50")(spec)
    layer4 = model.encoders["flair"].backbone.layer4
    assert [block.conv2.dilation for block in layer4] == [(2, 2), (4, 4), (8, 8)]
    assert [block.conv2.padding for block in layer4] == [(2, 2), (4, 4), (8, 8)]
    rates = [branch[0].dilation for branch in model.encoders["flair"].aspp.convs[1:4]]
    assert rates == [(2, 2), (4, 4), (6, 6)]
    out = model({"flair": torch.randn(2, 32, 32)})  # (H, W) spec: channel added
    assert out.prediction.shape == (2, 4, 32, 32)


def test_bad_inputs_raise_clear_errors(small_model):
    batch = _batch(size=48)
    with pytest.raises(ShapeError, match=r"'flair'.*\(B, 1, 64, 64\)"):
        small_model(batch)
    features, _ = small_model.encode(_batch())
    with pytest.raises(ShapeError, match=r"features\['t2'\] must be \(B, 320, h, w\)"):
        small_model.fusion(dict(features, t2=features["t2"][:, :256]))
    with pytest.raises(ConfigError, match="single-channel"):
        MODELS.build("deeplab", None, **SMALL)(_spec(shape=(4, 64, 64)))
    with pytest.raises(UnsupportedError, match="seg"):
        MODELS.build("deeplab", None, **SMALL)(DatasetSpec("cls", {"a": (1, 32, 32)}, 3))
    with pytest.raises(ConfigError, match="multi_grid"):
        MODELS.build("deeplab", None, backbone="resnet18")(_spec())  # 3 factors, 2 blocks
    with pytest.raises(ConfigError, match="backbone"):
        MODELS.build("deeplab", None, backbone="vgg16")


@pytest.mark.slow
def test_full_size_forward_backward():
    """4 x (ResNet-101 + ASPP) + decoder at 160 x 160, batch 2 (about 20 s and 4 GB on CPU)."""
    torch.manual_seed(0)
    model = MODELS.build("deeplab", "brats")(_spec(160))
    # equal to the official zrguo/CGGM DeepLabMultiInput(output_stride=16, num_classes=4)
    assert sum(p.numel() for p in model.parameters()) == 235_226_980
    out = model(_batch(160))
    assert out.prediction.shape == (2, 4, 160, 160)
    assert out.features["flair"].shape == (2, 256 + 256, 40, 40)
    assert out.extras["flair.low"].shape == (2, 256, 40, 40)
    assert out.head_input.shape == (2, 256, 160, 160)
    out.prediction.mean().backward()
    _check_groups(model)
    assert all(p.grad is not None for p in model.parameters())
