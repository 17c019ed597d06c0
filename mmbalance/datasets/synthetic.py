"""Embedded synthetic datasets with a planted modality imbalance (the default benchmark and CI data).

Every dataset here is generated in memory from ``Config.seed`` (a private ``torch.Generator``, so
global RNG state is neither read nor changed), in one draw of ``n_train + n_val + n_test`` samples
that is then cut into train / val / test; the splits are i.i.d. draws of the same generative
process. The seed also draws the "world" (class prototypes, projection directions), so two seeds
give two tasks of the same difficulty. Each split is a :class:`TensorDictDataset` (batched fetch).

The planted imbalance follows one recipe in every task:

* a **strong** modality shows *part* of the label in an *easy* form (linear, high
  signal-to-noise): joint training fits that part within the first epoch;
* a **weak** modality shows the *whole* label in a *hard* form (the evidence is not linearly
  readable from the input: it sits in the energy along a direction with a random sign, in a ratio
  of two projections, or in local contrast and texture), so its encoder must learn non-linear
  features, which takes time;
* the best fused model needs both: the part of the label the strong modality lacks is only in the
  weak one, and the weak modality's view of the shared part adds independent evidence.

Joint training then under-uses the weak modality: once the strong modality explains the shared
part of the label, the weak encoder receives gradient only for the rest, and learns less than when
it is trained alone (the "modality laziness" of Du et al., ICML 2023, and the modality competition
of Huang et al., ICML 2022). :mod:`mmbalance.analysis.probe` measures it (linear probes on the weak
encoder's frozen features; table in ``results/imbalance/README.md``). The data were designed to
make that phenomenon real, not tuned to make any balancing method win.

The generative process of each task and its parameters (the Configs, named by the symbols of
the process) are in :mod:`mmbalance.datasets.synthetic_generators`; this module serves them.

Recommended training for the planted effect: the ``synthetic`` preset (Adam 1e-3, batch 64,
8 epochs) with the ``small_*`` model builders; ``spec.default_model`` names the builder.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset, TensorDictDataset
from mmbalance.datasets.synthetic_generators import (
    Cls2Config,
    Cls3Config,
    Reg3Config,
    Seg4Config,
    SyntheticConfig,
    generate_cls2,
    generate_reg3,
    generate_seg4,
    redundant_view,
)
from mmbalance.errors import ConfigError

__all__ = [
    "SyntheticCls2",
    "SyntheticCls3",
    "SyntheticReg3",
    "SyntheticSeg4",
    "SyntheticConfig",
    "Cls2Config",
    "Cls3Config",
    "Reg3Config",
    "Seg4Config",
]


# -- shared machinery ------------------------------------------------------------------------------
class _Synthetic(MultimodalDataset):
    """Generates all samples once at construction and serves the three splits from memory."""

    Config: ClassVar[type] = SyntheticConfig
    default_preset: ClassVar[str] = "synthetic"
    default_model: ClassVar[str]
    strong_modality: ClassVar[str]
    weak_modality: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(f"config must be a {self.Config.__name__}, got {type(config).__name__}")
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed)
        n_total = config.n_train + config.n_val + config.n_test
        tensors = self._generate(n_total, gen)
        bounds = {
            "train": (0, config.n_train),
            "val": (config.n_train, config.n_train + config.n_val),
            "test": (config.n_train + config.n_val, n_total),
        }
        self._splits = {
            s: {k: v[a:b].contiguous() for k, v in tensors.items()} for s, (a, b) in bounds.items()
        }
        self.spec = self._make_spec()

    @abstractmethod
    def _generate(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        """``n`` samples: ``{modality: (n, ...) float32, "target": (n, ...)}``."""

    @abstractmethod
    def _make_spec(self) -> DatasetSpec: ...

    def _notes(self, **extra: Any) -> dict[str, Any]:
        return {
            "generator": f"mmbalance.datasets.synthetic.{type(self).__name__}",
            "seed": self.config.seed,
            "strong_modality": self.strong_modality,
            "weak_modality": self.weak_modality,
            "splits": "one seeded draw cut into train / val / test (i.i.d.)",
            **extra,
        }

    def split(self, split: str) -> TensorDictDataset:
        """The split as an in-memory :class:`TensorDictDataset` (tensors shared, not copied)."""
        self.check_split_name(split)
        return TensorDictDataset(self._splits[split])


# -- classification ---------------------------------------------------------------------------------
@register_dataset("synthetic_cls2")
class SyntheticCls2(_Synthetic):
    """Two-modality classification: an easy ``strong`` view of the coarse label and a hard ``weak``
    view (random-sign energy along label directions) of the coarse and the fine label."""

    Config = Cls2Config
    task = "cls"
    modality_names = ("strong", "weak")
    default_model = "small_mlp"
    strong_modality = "strong"
    weak_modality = "weak"
    paper = "mmbalance synthetic benchmark (planted imbalance)"

    def _generate(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        views, coarse = generate_cls2(self.config, n, gen)
        extra = self._extra_modalities(n, gen, coarse)
        return {"strong": views["strong"], "weak": views["weak"], **extra, "target": views["target"]}

    def _extra_modalities(self, n: int, gen: torch.Generator, coarse: Tensor) -> dict[str, Tensor]:
        return {}

    def _modality_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"strong": (self.config.strong_dim,), "weak": (self.config.weak_dim,)}

    def _make_spec(self) -> DatasetSpec:
        c = self.config
        return DatasetSpec(
            task="cls",
            modalities=self._modality_shapes(),
            num_outputs=c.num_classes,
            target_shape=(),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes=self._notes(classes="y = coarse * fine_classes + fine; the strong view shows only coarse"),
        )


@register_dataset("synthetic_cls3")
class SyntheticCls3(SyntheticCls2):
    """Three-modality classification: ``cls2`` plus a ``redundant`` noisier easy view of the coarse
    label, so two easy modalities compete with the weak one."""

    Config = Cls3Config
    modality_names = ("strong", "weak", "redundant")

    def _extra_modalities(self, n: int, gen: torch.Generator, coarse: Tensor) -> dict[str, Tensor]:
        return {"redundant": redundant_view(self.config, n, gen, coarse)}

    def _modality_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super()._modality_shapes()
        shapes["redundant"] = (self.config.redundant_dim,)
        return shapes


# -- regression ----------------------------------------------------------------------------------
@register_dataset("synthetic_reg3")
class SyntheticReg3(_Synthetic):
    """MOSI-like regression in [-3, 3] over three sequence modalities: ``text`` (strong, linear in
    one latent), ``audio`` (weak, both latents as sign-modulated ratios), ``vision`` (redundant)."""

    Config = Reg3Config
    task = "reg"
    modality_names = ("text", "audio", "vision")
    default_model = "small_transformer"
    strong_modality = "text"
    weak_modality = "audio"
    paper = "mmbalance synthetic benchmark (planted imbalance)"

    def _generate(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        return generate_reg3(self.config, n, gen)

    def _make_spec(self) -> DatasetSpec:
        c = self.config
        return DatasetSpec(
            task="reg",
            modalities={
                "text": (c.seq_len, c.text_dim),
                "audio": (c.seq_len, c.audio_dim),
                "vision": (c.seq_len, c.vision_dim),
            },
            num_outputs=1,
            target_shape=(),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes=self._notes(target_range=(-3.0, 3.0), text_weight=c.text_weight),
        )


# -- segmentation --------------------------------------------------------------------------------
@register_dataset("synthetic_seg4")
class SyntheticSeg4(_Synthetic):
    """BraTS-like 2D segmentation: four 1xSxS modalities, labels 0 bg / 1 NCR / 2 ED / 3 ET in
    nested regions; ``flair`` (strong) shows the whole tumour, ``t1ce`` (weak) the core's inside
    and the edema as texture."""

    Config = Seg4Config
    task = "seg"
    modality_names = ("flair", "t1ce", "t1", "t2")
    default_model = "small_seg"
    strong_modality = "flair"
    weak_modality = "t1ce"
    paper = "mmbalance synthetic benchmark (planted imbalance)"

    def _generate(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        return generate_seg4(self.config, n, gen)

    def _make_spec(self) -> DatasetSpec:
        s = self.config.size
        return DatasetSpec(
            task="seg",
            modalities={m: (1, s, s) for m in self.modality_names},
            num_outputs=4,
            target_shape=(s, s),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes=self._notes(
                labels="0 background, 1 NCR, 2 ED, 3 ET (BraTS with 4 remapped to 3)",
                regions="WT={1,2,3}, TC={1,3}, ET={3}; every image contains a tumour (no empty ground truth)",
            ),
        )
