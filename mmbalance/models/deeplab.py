"""``deeplab``: per-modality ResNet + ASPP encoders and a shared DeepLabv3+ decoder (BraTS 2021).

Official code: ``zrguo/CGGM`` ``models/segmodel.py:DeepLabMultiInput`` (built with
``output_stride=16`` in ``src/segtrain.py``), its ``ResNet101``, ``ASPP`` and ``Decoder``.

Architecture (4 modalities flair, t1ce, t1, t2; input ``(B, 1, 160, 160)`` each)::

    encoders[m] = timm ResNet (1 input channel, output stride 16; layer4 multi-grid (1, 2, 4));
                  ASPP (torchvision; rates 2, 4, 6) on layer4 -> (B, 256, H/16, W/16), bilinearly
                  upsampled to the layer1 size and concatenated with layer1
                  -> features[m] (B, 256 + 256, H/4, W/4); extras["<m>.low"] = layer1
    fusion      = DeepLabv3+ decoder front: the layer1 parts of all modalities (M x 256) -> 1x1 conv
                  -> 48, BN, ReLU; concatenated with the ASPP parts (M x 256) -> 3x3 conv -> 256
                                                                            (B, 256, H/4, W/4)
    head.body   = BN, ReLU, Dropout(0.5), 3x3 conv 256, BN, ReLU, Dropout(0.1), bilinear
                  upsampling to the input size (align_corners=True)        (B, 256, H, W)
    head.out_layer = Conv2d(256, C, 1)   (the official ``decoder.last_conv.7``)  -> (B, C, H, W)

This is the official computation rearranged so that the model keeps the library's contract
(``prediction == head(fusion(features))[0]``, ``fusion`` reads ``features`` only):

* the official decoder upsamples the concatenated ASPP outputs to the layer1 size; bilinear
  upsampling is per channel, so upsampling each modality's ASPP output in its encoder is the same;
* the official model upsamples the 4-channel logits after the final 1x1 conv; upsampling its
  256-channel input instead gives the same logits (a 1x1 conv and bilinear interpolation, whose
  weights sum to 1, commute) and makes ``head_input`` the full-resolution input of ``out_layer``
  (what per-pixel direction methods need), at the cost of a ``(B, 256, H, W)`` activation;
* a modality whose features are zeroed (``drop``, unimodal rows, per-modality evaluation) loses
  both its ASPP and its low-level part, as the official ``DeepLabMultiInput`` zeros both when an
  input is missing.

Other differences from the official code:

* backbone from timm (``features_only``, ``output_stride=16``, ``zero_init_last=False``);
  layer4's 3x3 convolutions get the official multi-grid dilations ``2 * (1, 2, 4)`` (timm alone
  would use 1, 2, 2); parameter shapes, and the parameter count, equal the official model's;
* ASPP is torchvision's ``ASPP`` (1x1 branch, three atrous 3x3 branches, image pooling, 1x1
  projection, Dropout 0.5: the official structure); its pooling branch upsamples with
  ``align_corners=False`` (from a 1x1 map: identical);
* initialisation as the official ``_init_weight`` (Kaiming-normal convolutions, BN 1/0) for ASPP,
  decoder and head; timm's for the ResNet (Kaiming-normal fan-out, as the official ResNet);
* the input size is fixed by the spec; any other input size is a ShapeError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import ConfigBase
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import register_model
from mmbalance.models.base import Head, ModelBuilder, MultimodalModel
from mmbalance.models.resize import BilinearResize, resize_bilinear

__all__ = ["DeepLabConfig", "DeepLabBuilder", "DeepLabEncoder", "DeepLabFusion", "BACKBONES"]

BACKBONES = ("resnet101", "resnet50", "resnet18")


def _init_official(module: nn.Module) -> None:
    """``segmodel._init_weight``: Kaiming-normal (fan-in) convolutions, BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _set_stage_dilations(stage: nn.Sequential, dilations: Sequence[int]) -> None:
    """Set the dilation (and same-size padding) of every 3x3 convolution of block ``i`` to
    ``dilations[i]`` (the official ``_make_MG_unit``); downsample branches are 1x1 and untouched."""
    for block, dilation in zip(stage, dilations, strict=True):
        for name, conv in block.named_modules():
            if (
                isinstance(conv, nn.Conv2d)
                and conv.kernel_size == (3, 3)
                and not name.startswith("downsample")
            ):
                if conv.stride != (1, 1):
                    raise ConfigError(f"cannot dilate strided conv {name} of a dilated stage")
                conv.dilation = (dilation, dilation)
                conv.padding = (dilation, dilation)


class DeepLabEncoder(nn.Module):
    """One modality: ResNet (1 channel), ASPP on layer4 upsampled to the layer1 size, then
    ``cat(aspp, layer1)``: returns ``(features (B, aspp_channels + low_channels, h, w), {"low": layer1})``.

    Input ``(B, 1, H, W)`` or ``(B, H, W)`` floats with ``(H, W)`` = the spec's size; ``(h, w)`` is
    the layer1 (1/4) resolution.
    """

    def __init__(self, modality: str, size: tuple[int, int], config: DeepLabConfig) -> None:
        super().__init__()
        import timm
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.modality, self.size = modality, size
        self.backbone = timm.create_model(
            config.backbone,
            pretrained=False,
            features_only=True,
            out_indices=(1, 4),
            output_stride=config.output_stride,
            in_chans=1,
            zero_init_last=False,
        )
        if config.multi_grid:
            stage = self.backbone.layer4
            if len(config.multi_grid) != len(stage):
                raise ConfigError(
                    f"multi_grid must have one factor per layer4 block of {config.backbone} ({len(stage)}), "
                    f"got {tuple(config.multi_grid)}; use () for timm's default dilations"
                )
            base = 2 if config.output_stride == 16 else 4
            _set_stage_dilations(stage, [base * g for g in config.multi_grid])
        if config.output_stride == 8:  # official: every layer3 block at dilation 2 (timm: 1, 2, 2, ...)
            _set_stage_dilations(self.backbone.layer3, [2] * len(self.backbone.layer3))
        low_channels, high_channels = self.backbone.feature_info.channels()
        self.low_channels = int(low_channels)
        self.aspp_channels = int(config.aspp_channels)
        self.aspp = ASPP(int(high_channels), list(config.aspp_rates), config.aspp_channels)
        _init_official(self.aspp)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != self.size:
            raise ShapeError(
                f"modality {self.modality!r}: expected (B, 1, {self.size[0]}, {self.size[1]}) or "
                f"(B, {self.size[0]}, {self.size[1]}) images, got {tuple(x.shape)}"
            )
        low, high = self.backbone(x)
        aspp = resize_bilinear(self.aspp(high), low.shape[-2:], align_corners=True)
        return torch.cat([aspp, low], dim=1), {"low": low}


class DeepLabFusion(nn.Module):
    """DeepLabv3+ decoder front over M modalities: features ``(B, A + L, h, w)`` each (ASPP part
    ``A = aspp_channels`` first, layer1 part ``L``) -> ``(B, decoder_channels, h, w)``."""

    def __init__(
        self, order: Sequence[str], aspp_channels: int, low_channels: int, config: DeepLabConfig
    ) -> None:
        super().__init__()
        self.order = tuple(order)
        self.aspp_channels, self.low_channels = aspp_channels, low_channels
        m = len(self.order)
        reduced = config.low_level_channels
        self.low_conv = nn.Conv2d(m * low_channels, reduced, 1, bias=False)  # official decoder.conv1
        self.low_bn = nn.BatchNorm2d(reduced)
        self.merge = nn.Conv2d(m * aspp_channels + reduced, config.decoder_channels, 3, padding=1, bias=False)
        _init_official(self)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        width = self.aspp_channels + self.low_channels
        for m in self.order:
            if features[m].dim() != 4 or features[m].shape[1] != width:
                raise ShapeError(
                    f"deeplab fusion: features[{m!r}] must be (B, {width}, h, w), "
                    f"got {tuple(features[m].shape)}"
                )
        high = [features[m][:, : self.aspp_channels] for m in self.order]
        low = torch.cat([features[m][:, self.aspp_channels :] for m in self.order], dim=1)
        low = F.relu(self.low_bn(self.low_conv(low)))
        return self.merge(torch.cat([*high, low], dim=1))  # official order: upsampled ASPP, then low


@dataclass(frozen=True)
class DeepLabConfig(ConfigBase):
    """DeepLabv3+ sizes; defaults are CGGM's BraTS model (``DeepLabMultiInput(output_stride=16)``)."""

    backbone: str = "resnet101"  # per-modality timm ResNet: resnet101 (paper) | resnet50 | resnet18 (tests)
    output_stride: int = 16  # backbone output stride, 16 (official segtrain) or 8
    # ASPP atrous rates: the official OS16 dilations [1, 2, 4, 6] without the 1x1 branch
    aspp_rates: tuple[int, ...] = (2, 4, 6)
    # layer4 per-block dilation factors (official multi-grid unit); () keeps timm's dilations
    multi_grid: tuple[int, ...] = (1, 2, 4)
    aspp_channels: int = 256  # ASPP output channels = features[m] channels
    low_level_channels: int = 48  # decoder's reduction of the concatenated layer1 features
    decoder_channels: int = 256  # decoder width = head input channels

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride!r}")
        for name in ("aspp_rates", "multi_grid"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ValueError(f"{name} must be a sequence of integers >= 1, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.aspp_rates:
            raise ValueError("aspp_rates must name at least one rate, got ()")
        for name in ("aspp_channels", "low_level_channels", "decoder_channels"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@register_model("deeplab")
class DeepLabBuilder(ModelBuilder):
    """Per-modality DeepLab encoders and a shared DeepLabv3+ decoder for 2D segmentation.

    ``spec.modalities[m]`` is ``(1, H, W)`` or ``(H, W)`` (the same for every modality); the
    prediction is ``(B, C, H, W)`` logits with ``C = spec.num_outputs``.
    """

    Config = DeepLabConfig
    presets = {"brats": {}}  # the defaults are the official BraTS settings
    tasks = frozenset({"seg"})
    paper = "DeepLabv3+ (Chen et al., ECCV 2018) per-modality encoders, as used by CGGM (NeurIPS 2024)"

    def __call__(self, spec: Any) -> MultimodalModel:
        c: DeepLabConfig = self.config
        if spec.task not in self.tasks:
            raise UnsupportedError(
                f"model 'deeplab' supports tasks {sorted(self.tasks)}, got task {spec.task!r}"
            )
        sizes = set()
        for m, shape in spec.modalities.items():
            shape = tuple(shape)
            if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)) or min(shape[-2:]) < 16:
                raise ConfigError(
                    f"model 'deeplab' needs single-channel images (1, H, W) or (H, W) with H, W >= 16; "
                    f"modality {m!r} has shape {shape}"
                )
            sizes.add(shape[-2:])
        if len(sizes) != 1:
            raise ConfigError(f"model 'deeplab' needs one image size for all modalities, got {sorted(sizes)}")
        size = tuple(int(s) for s in sizes.pop())
        encoders = {m: DeepLabEncoder(m, size, c) for m in spec.modality_names}
        low_channels = next(iter(encoders.values())).low_channels
        fusion = DeepLabFusion(spec.modality_names, c.aspp_channels, low_channels, c)
        body = nn.Sequential(
            nn.BatchNorm2d(c.decoder_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(c.decoder_channels, c.decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(c.decoder_channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            BilinearResize(size, align_corners=True),  # official: after out_layer
        )
        head = Head(body, nn.Conv2d(c.decoder_channels, int(spec.num_outputs), 1))
        _init_official(head)
        return MultimodalModel(encoders, fusion, head, modalities=spec.modality_names)
