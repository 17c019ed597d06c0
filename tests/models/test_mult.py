"""``mult``: MulT-style model for MOSI / IEMOCAP (mmbalance/models/mult.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import MODELS
from mmbalance.models.mult import MulTLayer, MulTTransformer, sinusoidal_table

MOSI_SPEC = DatasetSpec("reg", {"text": (50, 768), "audio": (50, 5), "vision": (50, 20)}, 1)
IEMOCAP_SPEC = DatasetSpec("cls", {"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)}, 4)


def _batch(
    spec: DatasetSpec, batch: int = 2, lengths: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m, (length, dim) in spec.modalities.items():
        length = (lengths or {}).get(m, length)
        out[m] = torch.randn(batch, length, dim, generator=g)
    return out


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Parameter counts of the official zrguo/CGGM MSAModel for these feature dims (reference cggm.md §9;
# equal by construction: same layer shapes).
@pytest.mark.parametrize(
    ("preset", "spec", "expected"),
    [("mosi", MOSI_SPEC, 390_441), ("iemocap", IEMOCAP_SPEC, 339_804)],
)
def test_parameter_count_matches_official(preset, spec, expected):
    model = MODELS.build("mult", preset)(spec)
    assert _trainable(model) == expected


@pytest.mark.parametrize(("preset", "spec"), [("mosi", MOSI_SPEC), ("iemocap", IEMOCAP_SPEC)])
def test_full_size_forward_backward(preset, spec):
    torch.manual_seed(0)
    model = MODELS.build("mult", preset)(spec)
    # IEMOCAP audio is 350 steps; shorter sequences keep the test fast (lengths are free).
    out = model(_batch(spec, lengths={"audio": 60}))
    classes = 1 if spec.task == "reg" else spec.num_outputs
    assert out.prediction.shape == (2, classes)
    assert out.head_input.shape == (2, 40)
    for m in spec.modality_names:
        assert out.features[m].shape[0] == 2 and out.features[m].shape[-1] == 40
    out.prediction.sum().backward()
    groups = {m: {id(p) for p in model.modality_parameters(m)} for m in spec.modality_names}
    assert all(groups.values())
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b]
    assert all(p.grad is not None for p in model.parameters())
    # the input projection is part of the modality group (official CGGM scales only the transformer)
    assert id(model.encoders["text"].proj.weight) in groups["text"]


def test_presets_depths_and_dropouts():
    mosi = MODELS.build("mult", "mosi")(MOSI_SPEC)
    iemo = MODELS.build("mult", "iemocap")(IEMOCAP_SPEC)
    assert len(mosi.encoders["text"].transformer.layers) == 5 and len(mosi.fusion.transformer.layers) == 3
    assert len(iemo.encoders["text"].transformer.layers) == 4 and len(iemo.fusion.transformer.layers) == 2
    layer = iemo.encoders["audio"].transformer.layers[0]
    assert isinstance(layer, MulTLayer)
    assert layer.self_attn.dropout == 0.15 and layer.dropout.p == 0.15
    assert layer.dropout1.p == 0.15 and layer.dropout2.p == 0.15
    assert iemo.encoders["audio"].transformer.embed_dropout.p == 0.2
    assert iemo.head.body.dropout.p == 0.2
    assert layer.norm_first and layer.linear1.out_features == 160


def test_fusion_puts_text_first_like_official():
    assert MODELS.build("mult", "iemocap")(IEMOCAP_SPEC).fusion.order == ("text", "audio", "vision")
    assert MODELS.build("mult")(IEMOCAP_SPEC).fusion.order == ("audio", "vision", "text")
    with pytest.raises(ConfigError, match="fusion_first"):
        MODELS.build("mult", None, fusion_first="speech")(IEMOCAP_SPEC)


def test_sinusoidal_table_hand_values():
    # dim 4: h = 2, w = (1, exp(-ln(10000))) = (1, 1e-4); row p = [sin p, sin 1e-4 p, cos p, cos 1e-4 p]
    table = sinusoidal_table(3, 4)
    assert torch.equal(table[0], torch.zeros(4))
    for p in (1, 2):
        expected = torch.tensor([math.sin(p), math.sin(1e-4 * p), math.cos(p), math.cos(1e-4 * p)])
        assert torch.allclose(table[p], expected, atol=1e-6)


def test_transformer_scales_input_adds_positions_and_skips_padding():
    torch.manual_seed(0)
    block = MulTTransformer(4, 2, 0).eval()  # no layers: LN(2 x + pos(x))
    x = torch.randn(1, 3, 4)
    x[0, 1, 0] = 0.0  # fairseq make_positions: first channel exactly 0 -> padding position (zero row)
    table = sinusoidal_table(4, 4)
    pos = torch.stack([table[1], table[0], table[3]])
    expected = torch.nn.functional.layer_norm(2.0 * x[0] + pos, (4,))
    assert torch.allclose(block(x)[0], expected, atol=1e-6)
    # positions grow past the initial table
    long = torch.randn(1, 700, 4)
    assert block(long).shape == (1, 700, 4)


def test_batch_first_and_variable_length():
    model = MODELS.build("mult", "mosi")(MOSI_SPEC).eval()
    a = model(_batch(MOSI_SPEC, lengths={"text": 7, "audio": 11, "vision": 5})).prediction
    assert a.shape == (2, 1)


def test_bad_inputs_raise_clear_errors():
    model = MODELS.build("mult", "mosi")(MOSI_SPEC)
    batch = _batch(MOSI_SPEC)
    batch["audio"] = torch.randn(2, 50, 6)
    with pytest.raises(ShapeError, match=r"'audio'.*\(B, L, 5\)"):
        model(batch)
    with pytest.raises(ConfigError, match="sequence features"):
        MODELS.build("mult")(DatasetSpec("cls", {"a": (8,), "b": (4, 3)}, 2))
    with pytest.raises(UnsupportedError, match="seg"):
        MODELS.build("mult")(DatasetSpec("seg", {"a": (4, 3)}, 2, target_shape=(4, 4)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"nlevels": 2}, "nlevels"), ({"attn_dropout": 1.0}, "attn_dropout"), ({"proj_dim": 42}, "proj_dim")],
)
def test_config_validation(overrides, field):
    with pytest.raises(ConfigError, match=field):
        MODELS.build("mult", None, **overrides)
