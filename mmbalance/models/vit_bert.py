"""``vit_bert``: frozen ViT-B/16 + BERT-base token extractors with trainable MulT-style encoders (Food-101).

Official code: ``zrguo/CGGM`` ``models/foodmodel.py:FoodModel`` and ``src/foodtrain.py`` (the
extractors are HF ``ViTModel`` / ``BertModel`` run under ``no_grad`` every step); settings from
``run/food_run.py``.

Architecture (``d = 40``)::

    image (B, 3, 224, 224) floats in [0, 1] -> frozen ViT-B/16 (timm)  -> tokens (B, 197, 768)
    text  (B, 50) int64 ids, pad id 0       -> frozen BERT-base          -> tokens (B, 50, 768)
    encoders[m] = backbone (frozen) -> proj Conv1d(768 -> d, k=1) -> MulT encoder (4 layers)
                  -> features[m] (B, T_m, d)
    fusion      = MulT encoder (2 layers) over cat(image, text) (247 tokens); token 0 = ViT CLS
    head        = residual MLP, out_layer Linear(d, 101)

Frozen extractors. Each modality's encoder holds its extractor as ``encoders[m].backbone``: its
parameters have ``requires_grad=False`` (so ``modality_parameters(m)``, the optimizer and gradient
clipping never see them), it stays in eval mode when the model is put in training mode, and it
runs under ``torch.no_grad()``. Weights are random unless a local path is given: ``vit_checkpoint``
(a timm-format state dict, ``.pth``/``.bin``/``.safetensors``; its classifier ``head.*`` is
dropped) and ``bert_path`` (a HF folder with ``config.json`` and weights). A checkpoint that does
not fit the configured architecture, or that lacks weights, raises; nothing is downloaded.
Images are fed in [0, 1] without mean/std normalisation, as the official loader does.

Feature cache (``cache_features=True``, see :mod:`mmbalance.models.feature_cache`): the frozen
extractors run once per split before training (:meth:`VitBertBuilder.prepare_splits`), and the
model is built without them: its encoders take the cached token features ``(B, 197, 768)`` /
``(B, 50, 768)`` directly. No train-time augmentation in that mode.

Differences from the official code:

* the image extractor is timm's ``vit_base_patch16_224`` (same architecture as HF
  ``google/vit-base-patch16-224``; ``forward_features`` = HF ``last_hidden_state``, after the final
  LayerNorm); a HF-format ViT checkpoint must be converted to timm keys first;
* the official ``FoodModel.forward`` projects the text tokens with the image projection
  ``projv`` (``projt`` is created but unused): here each modality has its own ``proj`` so that
  modality parameter groups are disjoint; the trainable parameter count is the same;
* BERT is built without its pooler (unused by the model: 590,592 fewer frozen parameters);
* batch-first tensors; attention via torch (see :mod:`mmbalance.models.mult`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmbalance.config import ConfigBase
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import register_model
from mmbalance.models.base import Head, ModelBuilder, MultimodalModel
from mmbalance.models.mult import (
    MulTEncoder,
    ResidualMLP,
    SequenceConcatFusion,
    check_dropouts,
    check_transformer_sizes,
    make_transformer,
)

__all__ = [
    "VitBertConfig",
    "VitBertBuilder",
    "FrozenExtractor",
    "ViTTokens",
    "BertTokens",
    "FrozenTokenEncoder",
    "IMAGE",
    "TEXT",
]

IMAGE, TEXT = "image", "text"  # the modality names this model serves (fusion order: image, text)
CACHE_DTYPES = ("float16", "float32")


class FrozenExtractor(nn.Module, ABC):
    """A pretrained feature extractor that never trains: frozen parameters, eval mode, ``no_grad``.

    Subclasses implement :meth:`extract` and :meth:`describe` (identity for the feature cache) and
    set ``feature_shape`` (per-sample output shape).
    """

    feature_shape: tuple[int, int]

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenExtractor:
        """Stay in eval mode (dropout off), whatever the parent asks."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.extract(x)

    @abstractmethod
    def extract(self, x: Tensor) -> Tensor:
        """Features of one batch (called under ``no_grad``)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the weights and output (the feature cache's key)."""


def _file_identity(path: str) -> dict[str, Any]:
    """Path, size and mtime of a file or of every file in a folder (cache keys, not security)."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return {
        "path": str(p.resolve()),
        "files": [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files],
    }


class ViTTokens(FrozenExtractor):
    """timm ViT: images ``(B, 3, S, S)`` floats -> tokens ``(B, 1 + (S/16)^2, D)`` (CLS first)."""

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        *,
        depth: int = 12,
        dim: int = 768,
        heads: int = 12,
        image_size: int = 224,
        checkpoint: str = "",
    ) -> None:
        super().__init__()
        import timm

        try:
            self.vit = timm.create_model(
                model_name,
                pretrained=False,
                num_classes=0,
                depth=depth,
                embed_dim=dim,
                num_heads=heads,
                img_size=image_size,
            )
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"vit_model {model_name!r} could not be built by timm with depth={depth}, "
                f"dim={dim}, heads={heads}, image_size={image_size}: {exc}"
            ) from exc
        self.model_name, self.checkpoint, self.image_size = model_name, checkpoint, image_size
        if checkpoint:
            self._load(checkpoint)
        tokens = self.vit.patch_embed.num_patches + self.vit.num_prefix_tokens
        self.feature_shape = (int(tokens), int(dim))
        self.freeze()

    def _load(self, path: str) -> None:
        from timm.models import load_state_dict

        if not Path(path).is_file():
            raise ConfigError(
                f"vit_checkpoint must be a local timm state-dict file, got {path!r} (no such file)"
            )
        state = load_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            self.vit.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"vit_checkpoint {path!r} does not fit timm {self.model_name!r} as configured "
                f"(vit_depth/vit_dim/vit_heads/image_size): {exc}"
            ) from exc

    def extract(self, images: Tensor) -> Tensor:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size) or not images.is_floating_point():
            raise ShapeError(
                f"modality 'image': expected float images (B, 3, {size}, {size}), "
                f"got {tuple(images.shape)} {images.dtype}"
            )
        return self.vit.forward_features(images)

    def describe(self) -> dict[str, Any]:
        cfg = {"model": self.model_name, "image_size": self.image_size, "shape": self.feature_shape}
        if self.checkpoint:
            cfg["checkpoint"] = _file_identity(self.checkpoint)
        else:
            cfg["random_init_digest"] = _state_digest(self)
        return cfg


class BertTokens(FrozenExtractor):
    """HF BERT: token ids ``(B, L)`` int64 (pad id ``pad_id``) -> ``last_hidden_state`` ``(B, L, D)``.

    The attention mask is ``ids != pad_id``; token type ids are 0 (single sentence).
    """

    def __init__(
        self,
        *,
        layers: int = 12,
        dim: int = 768,
        heads: int = 12,
        vocab: int = 30522,
        length: int = 50,
        pad_id: int = 0,
        path: str = "",
    ) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.path, self.pad_id, self.length = path, pad_id, length
        if path:
            if not (Path(path) / "config.json").is_file():
                raise ConfigError(f"bert_path must be a local HF BERT folder with config.json, got {path!r}")
            model, info = BertModel.from_pretrained(
                path, local_files_only=True, add_pooling_layer=False, output_loading_info=True
            )
            if info.get("missing_keys"):
                raise ConfigError(f"bert_path {path!r} lacks weights {sorted(info['missing_keys'])[:8]}")
            got = model.config
            expected = {"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads}
            wrong = {k: (getattr(got, k), v) for k, v in expected.items() if getattr(got, k) != v}
            if wrong:
                raise ConfigError(
                    "bert_path's config differs from bert_dim/bert_layers/bert_heads: "
                    + ", ".join(f"{k}={a} in the checkpoint, {b} configured" for k, (a, b) in wrong.items())
                )
            self.bert = model
        else:
            config = BertConfig(
                vocab_size=vocab,
                hidden_size=dim,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=4 * dim,
            )
            self.bert = BertModel(config, add_pooling_layer=False)
        if length > self.bert.config.max_position_embeddings:
            raise ConfigError(
                f"text length {length} exceeds BERT's max_position_embeddings "
                f"{self.bert.config.max_position_embeddings}"
            )
        self.vocab = int(self.bert.config.vocab_size)
        self.feature_shape = (int(length), int(dim))
        self.freeze()

    def extract(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] != self.length or ids.is_floating_point():
            raise ShapeError(
                f"modality 'text': expected int64 token ids (B, {self.length}), "
                f"got {tuple(ids.shape)} {ids.dtype}"
            )
        ids = ids.long()
        mask = ids != self.pad_id
        out = self.bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids))
        return out.last_hidden_state

    def describe(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"length": self.length, "pad_id": self.pad_id, "shape": self.feature_shape}
        if self.path:
            cfg["bert_path"] = _file_identity(self.path)
        else:
            cfg["random_init_digest"] = _state_digest(self)
        return cfg


def _state_digest(module: nn.Module) -> str:
    """Digest of a randomly initialised extractor's weights (a cache of random features must not be
    reused by a run whose random extractor differs)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().flatten()[:: max(1, t.numel() // 4096)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class FrozenTokenEncoder(MulTEncoder):
    """``backbone`` (a :class:`FrozenExtractor`, or ``None`` for cached features) then ``proj`` and
    the MulT ``transformer``. ``modality_parameters`` holds only ``proj`` + ``transformer``."""

    def __init__(
        self, modality: str, in_dim: int, transformer: nn.Module, backbone: FrozenExtractor | None
    ) -> None:
        super().__init__(modality, in_dim, transformer)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            x = self.backbone(x)
        elif x.dim() != 3 or not x.is_floating_point():
            raise ShapeError(
                f"modality {self.modality!r}: with cache_features=true the model takes cached token features "
                f"(B, L, {self.in_dim}) from VitBertBuilder.prepare_splits, got {tuple(x.shape)} {x.dtype}"
            )
        return super().forward(x)


_DROPOUTS = ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout", "out_dropout")


@dataclass(frozen=True)
class VitBertConfig(ConfigBase):
    """Sizes of the Food-101 model; defaults are CGGM's ``run/food_run.py`` and ViT-B/16 + BERT-base."""

    proj_dim: int = 40  # d: width of the trainable transformers
    num_heads: int = 5  # attention heads of the trainable transformers
    nlevels: int = 4  # encoder layers per modality; the fusion has nlevels - 2
    attn_dropout: float = 0.2  # dropout on attention weights
    relu_dropout: float = 0.15  # dropout between the feed-forward linears
    res_dropout: float = 0.15  # dropout on residual branches
    embed_dropout: float = 0.2  # dropout at each transformer's input
    out_dropout: float = 0.1  # dropout in the residual MLP head
    vit_model: str = "vit_base_patch16_224"  # timm architecture of the frozen image extractor
    vit_checkpoint: str = ""  # local timm state dict for the ViT; "" = random init (nothing downloads)
    vit_depth: int = 12  # ViT blocks (ViT-B: 12; smaller for tests)
    vit_dim: int = 768  # ViT width (ViT-B: 768)
    vit_heads: int = 12  # ViT heads (ViT-B: 12)
    image_size: int = 224  # input side; tokens = 1 + (image_size / 16)^2
    bert_path: str = ""  # local HF BERT folder; "" = random BertModel(BertConfig(...))
    bert_layers: int = 12  # BERT layers (base: 12)
    bert_dim: int = 768  # BERT width (base: 768)
    bert_heads: int = 12  # BERT heads (base: 12)
    bert_vocab: int = 30522  # vocabulary size of a random BERT (bert-base-uncased: 30522)
    pad_id: int = 0  # token id of padding; BERT's attention mask is ids != pad_id
    extractor_seed: int = 0  # seed of the extractors' random init when no checkpoint is given
    cache_features: bool = False  # extract frozen features once per split (no train augmentation)
    cache_dir: str = ""  # where cached features persist across runs; "" = in memory for this run
    cache_dtype: str = "float16"  # storage dtype of cached features
    cache_batch_size: int = 64  # batch size of the one-off extraction pass

    def check(self) -> None:
        check_transformer_sizes(self)
        check_dropouts(self, _DROPOUTS)
        for name in (
            "vit_depth",
            "vit_dim",
            "vit_heads",
            "bert_layers",
            "bert_dim",
            "bert_heads",
            "bert_vocab",
            "cache_batch_size",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.image_size, int) and self.image_size >= 16 and self.image_size % 16 == 0):
            raise ValueError(
                f"image_size must be a positive multiple of 16 (patch size), got {self.image_size!r}"
            )
        if self.vit_dim % self.vit_heads or self.bert_dim % self.bert_heads:
            raise ValueError(
                f"vit_dim/bert_dim must be divisible by vit_heads/bert_heads, "
                f"got {self.vit_dim}/{self.vit_heads} and {self.bert_dim}/{self.bert_heads}"
            )
        if not (isinstance(self.pad_id, int) and 0 <= self.pad_id < self.bert_vocab):
            raise ValueError(f"pad_id must be in [0, bert_vocab={self.bert_vocab}), got {self.pad_id!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.cache_dir and not self.cache_features:
            raise ValueError(
                f"cache_dir is set ({self.cache_dir!r}) but cache_features is False; set cache_features=true"
            )


@register_model("vit_bert")
class VitBertBuilder(ModelBuilder):
    """Frozen ViT + BERT extractors, trainable MulT-style encoders and fusion (UPMC Food-101).

    ``spec.modalities`` must be ``image`` ``(3, S, S)`` and ``text`` ``(L,)`` (raw inputs), or, in
    cached mode, the cached token shapes ``(T, vit_dim)`` / ``(L, bert_dim)``.
    """

    Config = VitBertConfig
    presets = {"food101": {}}  # the defaults are the official Food-101 settings
    tasks = frozenset({"cls"})
    paper = "ViT-B/16 + BERT-base frozen extractors with MulT-style encoders, as used by CGGM (NeurIPS 2024)"

    # -- extractors ---------------------------------------------------------------------------
    def extractors(self, text_length: int) -> dict[str, FrozenExtractor]:
        """Build (and load, from local paths) the frozen extractors, keyed by modality.

        Random initialisation (no checkpoint) draws from a private generator seeded with
        ``extractor_seed``: the global RNG is left untouched, so the trainable part's
        initialisation, and random extractors, are the same with and without the feature cache.
        """
        c: VitBertConfig = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.extractor_seed)
            vit = ViTTokens(
                c.vit_model,
                depth=c.vit_depth,
                dim=c.vit_dim,
                heads=c.vit_heads,
                image_size=c.image_size,
                checkpoint=c.vit_checkpoint,
            )
            bert = BertTokens(
                layers=c.bert_layers,
                dim=c.bert_dim,
                heads=c.bert_heads,
                vocab=c.bert_vocab,
                length=text_length,
                pad_id=c.pad_id,
                path=c.bert_path,
            )
        return {IMAGE: vit, TEXT: bert}

    def _image_tokens(self) -> int:
        return 1 + (self.config.image_size // 16) ** 2

    def _input_form(self, spec: Any) -> tuple[str, int]:
        """("raw" | "cached", text length) from the spec's shapes; raises on anything else."""
        c: VitBertConfig = self.config
        if spec.task not in self.tasks:
            raise UnsupportedError(
                f"model 'vit_bert' supports tasks {sorted(self.tasks)}, got task {spec.task!r}"
            )
        if set(spec.modality_names) != {IMAGE, TEXT}:
            raise ConfigError(f"model 'vit_bert' needs modalities {(IMAGE, TEXT)}, got {spec.modality_names}")
        img, txt = tuple(spec.modalities[IMAGE]), tuple(spec.modalities[TEXT])
        raw_img = (3, c.image_size, c.image_size)
        cached_img = (self._image_tokens(), c.vit_dim)
        if img == raw_img and len(txt) == 1 and txt[0] >= 1:
            return "raw", int(txt[0])
        if img == cached_img and len(txt) == 2 and txt[1] == c.bert_dim and txt[0] >= 1:
            return "cached", int(txt[0])
        raise ConfigError(
            f"model 'vit_bert' expects image {raw_img} and text (L,) token ids, or cached features image "
            f"{cached_img} and text (L, {c.bert_dim}); the dataset gives image {img} and text {txt}"
        )

    # -- data preparation (feature cache) -----------------------------------------------------
    def prepare_splits(
        self,
        splits: Mapping[str, Dataset],
        spec: Any,
        device: torch.device | str = "cpu",
        *,
        dataset_key: str | None = None,
    ) -> tuple[dict[str, Dataset], Any]:
        """With ``cache_features``, replace every split by its cached features and return the
        matching spec; otherwise return the inputs unchanged.

        ``dataset_key`` identifies the data (e.g. the canonical JSON of the dataset config); it is
        required with ``cache_dir`` so that a persisted cache is only reused for the same data.
        """
        if not self.config.cache_features:
            return dict(splits), spec
        from mmbalance.models.feature_cache import cache_splits

        form, length = self._input_form(spec)
        if form == "cached":
            raise ConfigError("prepare_splits got a spec that already describes cached features")
        extractors = self.extractors(length)
        dtype = getattr(torch, self.config.cache_dtype)
        out = cache_splits(
            splits,
            extractors,
            spec,
            device=torch.device(device),
            dtype=dtype,
            batch_size=self.config.cache_batch_size,
            cache_dir=self.config.cache_dir or None,
            dataset_key=dataset_key,
        )
        del extractors
        return out

    # -- model ----------------------------------------------------------------------------------
    def __call__(self, spec: Any) -> MultimodalModel:
        c: VitBertConfig = self.config
        form, length = self._input_form(spec)
        if form == "cached" and not c.cache_features:
            raise ConfigError(
                "the dataset gives cached features but cache_features is False; set cache_features=true"
            )
        if c.cache_features:
            backbones: dict[str, FrozenExtractor | None] = {IMAGE: None, TEXT: None}
        else:
            backbones = dict(self.extractors(length))
        dims = {IMAGE: c.vit_dim, TEXT: c.bert_dim}
        encoders = {
            m: FrozenTokenEncoder(m, dims[m], make_transformer(c, c.nlevels), backbones[m])
            for m in (IMAGE, TEXT)
        }
        fusion = SequenceConcatFusion((IMAGE, TEXT), make_transformer(c, c.nlevels - 2))
        head = Head(ResidualMLP(c.proj_dim, c.out_dropout), nn.Linear(c.proj_dim, int(spec.num_outputs)))
        return MultimodalModel(encoders, fusion, head, modalities=spec.modality_names)
