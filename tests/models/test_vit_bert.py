"""``vit_bert``: frozen ViT + BERT extractors with trainable MulT-style encoders
(mmbalance/models/vit_bert.py)."""

from __future__ import annotations

import pytest
import torch

from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import MODELS
from mmbalance.models.vit_bert import BertTokens, ViTTokens

# Reduced extractors for fast tests: 2-block ViT (dim 64) on 32 x 32 images, 2-layer BERT (dim 64).
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
SPEC = DatasetSpec("cls", {"image": (3, 32, 32), "text": (12,)}, 101)


def _batch(batch: int = 2, image: int = 32, length: int = 12, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    ids[:, length - 3 :] = 0  # padding
    return {"image": torch.rand(batch, 3, image, image, generator=g), "text": ids}


def _check_frozen_and_groups(model) -> None:
    frozen = [p for m in ("image", "text") for p in model.encoders[m].backbone.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    groups = {m: {id(p) for p in model.modality_parameters(m)} for m in ("image", "text")}
    assert groups["image"] and groups["text"] and not groups["image"] & groups["text"]
    assert not {id(p) for p in frozen} & (groups["image"] | groups["text"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


def test_reduced_forward_backward():
    torch.manual_seed(0)
    model = MODELS.build("vit_bert", None, **SMALL)(SPEC)
    model.train()
    assert not model.encoders["image"].backbone.training  # frozen extractors stay in eval mode
    assert not model.encoders["text"].backbone.training
    assert model.encoders["image"].transformer.training
    out = model(_batch())
    assert out.prediction.shape == (2, 101)
    assert out.features["image"].shape == (2, 5, 40)  # CLS + (32/16)^2 patches
    assert out.features["text"].shape == (2, 12, 40)
    assert model.fusion.order == ("image", "text")  # fused token 0 = ViT CLS
    out.prediction.logsumexp(dim=1).sum().backward()
    _check_frozen_and_groups(model)


def test_rng_isolated_so_cached_and_uncached_models_start_equal():
    torch.manual_seed(3)
    raw = MODELS.build("vit_bert", None, **SMALL)(SPEC)
    torch.manual_seed(3)
    cached = MODELS.build("vit_bert", None, cache_features=True, **SMALL)(SPEC)
    raw_state = {k: v for k, v in raw.state_dict().items() if ".backbone." not in k}
    assert raw_state.keys() == cached.state_dict().keys()
    assert all(torch.equal(v, cached.state_dict()[k]) for k, v in raw_state.items())
    assert cached.encoders["image"].backbone is None


def test_text_padding_is_masked():
    # With the attention mask, tokens before the padding do not depend on how much padding follows.
    torch.manual_seed(0)
    short = BertTokens(layers=2, dim=64, heads=2, vocab=100, length=4)
    long = BertTokens(layers=2, dim=64, heads=2, vocab=100, length=7)
    long.load_state_dict(short.state_dict())
    ids = torch.tensor([[5, 9, 13, 0]])
    padded = torch.tensor([[5, 9, 13, 0, 0, 0, 0]])
    a, b = short(ids), long(padded)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)


def test_local_checkpoints_load_and_mismatches_raise(tmp_path):
    import timm
    from transformers import BertConfig, BertModel

    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        depth=2,
        embed_dim=64,
        num_heads=2,
        img_size=32,
        num_classes=7,
    )  # a checkpoint with a classifier head
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    loaded = ViTTokens(depth=2, dim=64, heads=2, image_size=32, checkpoint=str(tmp_path / "vit.pth"))
    assert torch.equal(loaded.vit.pos_embed, vit.pos_embed)
    with pytest.raises(ConfigError, match="vit_checkpoint"):
        ViTTokens(depth=3, dim=64, heads=2, image_size=32, checkpoint=str(tmp_path / "vit.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        ViTTokens(depth=2, dim=64, heads=2, image_size=32, checkpoint=str(tmp_path / "missing.pth"))

    bert = BertModel(
        BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    tokens = BertTokens(layers=2, dim=64, heads=2, length=12, path=str(tmp_path / "bert"))
    assert torch.equal(tokens.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match="num_hidden_layers=2 in the checkpoint, 3 configured"):
        BertTokens(layers=3, dim=64, heads=2, length=12, path=str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="bert_path"):
        BertTokens(layers=2, dim=64, heads=2, length=12, path=str(tmp_path / "nothing"))


def test_bad_inputs_raise_clear_errors():
    model = MODELS.build("vit_bert", None, **SMALL)(SPEC)
    batch = _batch()
    with pytest.raises(ShapeError, match=r"'image'.*\(B, 3, 32, 32\)"):
        model(dict(batch, image=torch.rand(2, 3, 48, 48)))
    with pytest.raises(ShapeError, match="int64 token ids"):
        model(dict(batch, text=batch["text"].float()))
    with pytest.raises(ConfigError, match=r"needs modalities \('image', 'text'\)"):
        MODELS.build("vit_bert", None, **SMALL)(
            DatasetSpec("cls", {"image": (3, 32, 32), "caption": (12,)}, 3)
        )
    with pytest.raises(ConfigError, match="expects image"):
        MODELS.build("vit_bert", None, **SMALL)(DatasetSpec("cls", {"image": (3, 64, 64), "text": (12,)}, 3))
    with pytest.raises(ConfigError, match="cache_features is False"):
        MODELS.build("vit_bert", None, **SMALL)(DatasetSpec("cls", {"image": (5, 64), "text": (12, 64)}, 3))
    with pytest.raises(UnsupportedError):
        MODELS.build("vit_bert", None, **SMALL)(DatasetSpec("reg", {"image": (3, 32, 32), "text": (12,)}, 1))
    with pytest.raises(ConfigError, match="image_size"):
        MODELS.build("vit_bert", None, image_size=100)
    with pytest.raises(ConfigError, match="cache_dir"):
        MODELS.build("vit_bert", None, cache_dir="/tmp/x")


def test_full_size_forward_backward():
    """ViT-B/16 + BERT-base (random init) + trainable part, batch 2 (about 4 s, 1 GB on one CPU thread)."""
    torch.manual_seed(0)
    spec = DatasetSpec("cls", {"image": (3, 224, 224), "text": (50,)}, 101)
    model = MODELS.build("vit_bert", "food101")(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == 266_381  # = official FoodModel (which also holds the unused `projt`)
    assert frozen == 85_798_656 + 108_891_648  # timm ViT-B/16 without head + BERT-base without pooler
    out = model(_batch(image=224, length=50, vocab=30522))
    assert out.prediction.shape == (2, 101)
    assert out.features["image"].shape == (2, 197, 40) and out.features["text"].shape == (2, 50, 40)
    out.prediction.logsumexp(dim=1).sum().backward()
    _check_frozen_and_groups(model)
