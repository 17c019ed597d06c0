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

Generative processes (``ε`` is standard normal noise and ``r`` a random sign ±1, each drawn
independently wherever it appears):

``synthetic_cls2`` (cls; modalities ``strong`` (d_s,), ``weak`` (d_w,)):
    a coarse label ``c ~ U{0..K_c-1}`` and a fine label ``f ~ U{0..K_f-1}``; the class is
    ``y = c * K_f + f`` (K = K_c K_f classes).
    ``strong = a_s * μ_c + σ_s ε`` with K_c random unit prototypes ``μ`` in R^{d_s}: c only, easy.
    ``weak = a_w * (r v_c + r' w_f) + σ_w ε`` with K_c + K_f orthonormal directions ``v, w`` in
    R^{d_w}: both labels, as *which* directions carry energy; the class-conditional mean is 0, so
    no linear function of the input reads it and the encoder must learn ``|<x, v_k>|``-like features.
    Strong alone: at most ``1 / K_f`` of the fine label; weak alone: slow; fused: c from both, f from
    weak. In joint training the weak encoder is pushed to learn f but hardly c.

``synthetic_cls3`` (cls; ``strong``, ``weak``, ``redundant``): as ``cls2``, plus
    ``redundant = a_r * μ'_c + σ_r ε`` with its own prototypes and a lower signal: a second easy view
    of the coarse label, so two modalities compete with the weak one for it.

``synthetic_reg3`` (reg, MOSI-like; ``text`` (L, d_t), ``audio`` (L, d_a), ``vision`` (L, d_v)):
    latents ``a, b ~ U(-1, 1)``, target ``y = w_a a + w_b b`` with ``w_a + w_b = 3``, so
    ``y ∈ [-3, 3]`` (the MOSI range); ``w_a > w_b``.
    ``text[l] = s_t a u_t + σ_t ε_l`` at every step l: ``a`` linearly (easy after pooling over time).
    ``audio[l] = s_a r_l (u_a + a v_a + b z_a) + σ_a ε_l`` with orthonormal ``u_a, v_a, z_a``: the
    per-step sign ``r_l`` makes the time mean 0 whatever a and b are; a and b are the *ratios* of
    the energy along ``v_a`` and ``z_a`` to that along ``u_a`` (per-step products of projections),
    so the encoder must learn non-linear token features.
    ``vision[l] = s_v a u_v + σ_v ε_l``: a noisier view of text's evidence (redundant).
    Text alone leaves ``w_b b`` unexplained; audio alone is slow and noisy.

``synthetic_seg4`` (seg, BraTS-like; ``flair``, ``t1ce``, ``t1``, ``t2``, each (1, S, S); labels
    0 background, 1 necrotic core (NCR), 2 edema (ED), 3 enhancing tumour (ET), i.e. BraTS with 4
    remapped to 3; regions WT = {1, 2, 3}, TC = {1, 3}, ET = {3}):
    one tumour per image: a rotated ellipse (whole tumour), a smaller similar ellipse at a random
    offset inside it (tumour core), and a necrotic ellipse centred in the core; ET is the core minus
    the necrosis (a ring), ED the whole tumour minus the core. Every image contains a tumour (no
    empty ground truth). Every modality has a smooth random "anatomy" background (bilinearly
    upsampled 4x4 noise) plus pixel noise. ``flair`` shows the whole tumour bright and uniform
    (easy: WT, nothing inside it); ``t2`` is a dimmer copy (redundant). ``t1ce`` shows the ET ring
    bright, the necrosis dark and the edema only as zero-mean texture (more variance, same mean):
    the only source of TC and ET, and a hard view of WT. ``t1`` shows a faintly dark core.

Recommended training for the planted effect: the ``synthetic`` preset (Adam 1e-3, batch 64,
8 epochs) with the ``small_*`` model builders; ``spec.default_model`` names the builder.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import ConfigBase
from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset, TensorDictDataset
from mmbalance.errors import ConfigError

__all__ = [
    "SyntheticCls2",
    "SyntheticCls3",
    "SyntheticReg3",
    "SyntheticSeg4",
    "SyntheticConfig",
]


# -- configs ---------------------------------------------------------------------------------------
def _need(cond: bool, config: Any, field_name: str, expected: str) -> None:
    if not cond:
        raise ValueError(f"{field_name} must be {expected}, got {getattr(config, field_name)!r}")


@dataclass(frozen=True)
class SyntheticConfig(ConfigBase):
    """Split sizes and seed, shared by every synthetic dataset."""

    n_train: int = 2000  # training samples
    n_val: int = 500  # validation samples (model selection, method statistics)
    n_test: int = 1000  # test samples (read once, at the end)
    seed: int = 0  # draws the world (prototypes, directions) and every sample

    def check(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            _need(
                isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                self,
                name,
                "an integer >= 1",
            )
        _need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, self, "seed", "an integer in [0, 2**63)")


@dataclass(frozen=True)
class Cls2Config(SyntheticConfig):
    """``synthetic_cls2``: label structure, input sizes, signal amplitudes and noise levels."""

    coarse_classes: int = 4  # K_c, values of the coarse label c (what the strong view shows)
    fine_classes: int = 2  # K_f, values of the fine label f; classes y = c * K_f + f, K = K_c * K_f
    strong_dim: int = 16  # d_s, input size of the strong modality
    weak_dim: int = 32  # d_w, input size of the weak modality (>= K_c + K_f)
    strong_signal: float = 3.0  # a_s, amplitude of the coarse prototype in the strong view
    strong_noise: float = 1.0  # σ_s, per-dimension noise std of the strong view
    weak_signal: float = 3.0  # a_w, amplitude along each of the weak view's two label directions
    weak_noise: float = 1.0  # σ_w, per-dimension noise std of the weak view

    def check(self) -> None:
        super().check()
        for name in ("coarse_classes", "fine_classes"):
            _need(
                isinstance(getattr(self, name), int) and getattr(self, name) >= 2,
                self,
                name,
                "an integer >= 2",
            )
        _need(
            isinstance(self.strong_dim, int) and self.strong_dim >= 1, self, "strong_dim", "an integer >= 1"
        )
        _need(
            isinstance(self.weak_dim, int) and self.weak_dim >= self.coarse_classes + self.fine_classes,
            self,
            "weak_dim",
            f"an integer >= coarse_classes + fine_classes ({self.coarse_classes + self.fine_classes})",
        )
        for name in ("strong_signal", "weak_signal"):
            _need(getattr(self, name) >= 0, self, name, ">= 0")
        for name in ("strong_noise", "weak_noise"):
            _need(getattr(self, name) > 0, self, name, "> 0")

    @property
    def num_classes(self) -> int:
        """K = K_c * K_f."""
        return self.coarse_classes * self.fine_classes


@dataclass(frozen=True)
class Cls3Config(Cls2Config):
    """``synthetic_cls3``: ``cls2`` plus the redundant modality."""

    redundant_dim: int = 16  # d_r, input size of the redundant modality
    redundant_signal: float = 1.5  # a_r, coarse-prototype amplitude of the redundant view
    redundant_noise: float = 1.0  # σ_r, per-dimension noise std of the redundant view

    def check(self) -> None:
        super().check()
        _need(
            isinstance(self.redundant_dim, int) and self.redundant_dim >= 1,
            self,
            "redundant_dim",
            "an integer >= 1",
        )
        _need(self.redundant_signal >= 0, self, "redundant_signal", ">= 0")
        _need(self.redundant_noise > 0, self, "redundant_noise", "> 0")


@dataclass(frozen=True)
class Reg3Config(SyntheticConfig):
    """``synthetic_reg3``: sequence length, feature sizes, target weights, amplitudes, noise."""

    seq_len: int = 8  # L, time steps of every modality
    text_dim: int = 16  # d_t
    audio_dim: int = 16  # d_a (>= 3)
    vision_dim: int = 8  # d_v
    text_weight: float = 1.8  # w_a, weight of the text latent; the audio weight is w_b = 3 - w_a
    text_signal: float = 1.0  # s_t, amplitude of a along u_t per step
    text_noise: float = 1.0  # σ_t, per-dimension, per-step noise std of text
    audio_signal: float = 1.0  # s_a, amplitude of the sign-modulated audio pattern
    audio_noise: float = 1.0  # σ_a
    vision_signal: float = 0.5  # s_v, amplitude of a along u_v per step (redundant with text)
    vision_noise: float = 1.0  # σ_v

    def check(self) -> None:
        super().check()
        _need(isinstance(self.seq_len, int) and self.seq_len >= 1, self, "seq_len", "an integer >= 1")
        for name in ("text_dim", "vision_dim"):
            _need(
                isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                self,
                name,
                "an integer >= 1",
            )
        _need(isinstance(self.audio_dim, int) and self.audio_dim >= 3, self, "audio_dim", "an integer >= 3")
        _need(0.0 <= self.text_weight <= 3.0, self, "text_weight", "in [0, 3] (w_a + w_b = 3)")
        for name in ("text_signal", "audio_signal", "vision_signal"):
            _need(getattr(self, name) >= 0, self, name, ">= 0")
        for name in ("text_noise", "audio_noise", "vision_noise"):
            _need(getattr(self, name) > 0, self, name, "> 0")


@dataclass(frozen=True)
class Seg4Config(SyntheticConfig):
    """``synthetic_seg4``: image size and per-modality contrasts (the noise levels are shared)."""

    n_train: int = 1000  # training samples (each carries S*S supervised pixels)
    n_val: int = 250
    n_test: int = 500
    size: int = 24  # S, image height and width (>= 16); 24 keeps a run fast on CPU
    flair_contrast: float = 1.5  # whole-tumour brightness in flair (strong)
    t2_contrast: float = 0.8  # whole-tumour brightness in t2 (redundant)
    t1ce_et_contrast: float = 1.5  # enhancing-ring brightness in t1ce (weak)
    t1ce_ncr_contrast: float = 1.0  # necrosis darkening in t1ce
    t1ce_ed_texture: float = 1.0  # amplitude of the random-sign edema texture in t1ce (zero mean)
    t1_contrast: float = 0.2  # core darkening in t1
    background: float = 0.5  # std of the smooth anatomy background (all modalities)
    noise: float = 0.5  # std of the pixel noise (all modalities)

    def check(self) -> None:
        super().check()
        _need(isinstance(self.size, int) and self.size >= 16, self, "size", "an integer >= 16")
        for name in (
            "flair_contrast",
            "t2_contrast",
            "t1ce_et_contrast",
            "t1ce_ncr_contrast",
            "t1ce_ed_texture",
            "t1_contrast",
            "background",
        ):
            _need(getattr(self, name) >= 0, self, name, ">= 0")
        _need(self.noise > 0, self, "noise", "> 0")


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


def _unit_rows(gen: torch.Generator, k: int, dim: int) -> Tensor:
    """``k`` random unit vectors in R^dim, shape (k, dim)."""
    v = torch.randn(k, dim, generator=gen)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _orthonormal_rows(gen: torch.Generator, k: int, dim: int) -> Tensor:
    """``k <= dim`` orthonormal random vectors in R^dim, shape (k, dim)."""
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    return q.T.contiguous()


def _random_sign(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


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
        c = self.config
        mu = _unit_rows(gen, c.coarse_classes, c.strong_dim)  # coarse prototypes of the strong view
        directions = _orthonormal_rows(gen, c.coarse_classes + c.fine_classes, c.weak_dim)
        v, w = directions[: c.coarse_classes], directions[c.coarse_classes :]
        coarse = torch.randint(0, c.coarse_classes, (n,), generator=gen)
        fine = torch.randint(0, c.fine_classes, (n,), generator=gen)
        y = coarse * c.fine_classes + fine
        strong = c.strong_signal * mu[coarse] + c.strong_noise * torch.randn(n, c.strong_dim, generator=gen)
        weak = c.weak_signal * (_random_sign(gen, n, 1) * v[coarse] + _random_sign(gen, n, 1) * w[fine])
        weak = weak + c.weak_noise * torch.randn(n, c.weak_dim, generator=gen)
        return {"strong": strong, "weak": weak, **self._extra_modalities(n, gen, coarse), "target": y}

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
        c = self.config
        mu_r = _unit_rows(gen, c.coarse_classes, c.redundant_dim)
        noise = c.redundant_noise * torch.randn(n, c.redundant_dim, generator=gen)
        return {"redundant": c.redundant_signal * mu_r[coarse] + noise}

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
        c = self.config
        u_t = _unit_rows(gen, 1, c.text_dim)[0]
        uv_a = _orthonormal_rows(gen, 3, c.audio_dim)
        u_v = _unit_rows(gen, 1, c.vision_dim)[0]
        a = torch.rand(n, generator=gen) * 2 - 1
        b = torch.rand(n, generator=gen) * 2 - 1
        target = c.text_weight * a + (3.0 - c.text_weight) * b
        L = c.seq_len
        text = (a * c.text_signal)[:, None, None] * u_t + c.text_noise * torch.randn(
            n, L, c.text_dim, generator=gen
        )
        gain = _random_sign(gen, n, L, 1)
        pattern = uv_a[0] + a[:, None] * uv_a[1] + b[:, None] * uv_a[2]  # (n, d_a): tilts a and b
        audio = c.audio_signal * gain * pattern[:, None, :] + c.audio_noise * torch.randn(
            n, L, c.audio_dim, generator=gen
        )
        vision = (a * c.vision_signal)[:, None, None] * u_v + c.vision_noise * torch.randn(
            n, L, c.vision_dim, generator=gen
        )
        return {"text": text, "audio": audio, "vision": vision, "target": target}

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

    def _ellipse(
        self, grid_y: Tensor, grid_x: Tensor, cy: Tensor, cx: Tensor, ry: Tensor, rx: Tensor, theta: Tensor
    ) -> Tensor:
        """Boolean masks (n, S, S) of rotated ellipses; every argument but the grids is (n,)."""
        dy = grid_y[None] - cy[:, None, None]
        dx = grid_x[None] - cx[:, None, None]
        cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
        u = (dx * cos + dy * sin) / rx[:, None, None]
        v = (-dx * sin + dy * cos) / ry[:, None, None]
        return u.square() + v.square() <= 1.0

    def _smooth_field(self, n: int, gen: torch.Generator) -> Tensor:
        """(n, S, S) smooth random background: 4x4 noise upsampled bilinearly, unit-ish std."""
        s = self.config.size
        coarse = torch.randn(n, 1, 4, 4, generator=gen)
        return F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)[:, 0]

    def _generate(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        c = self.config
        s = c.size
        coords = torch.arange(s, dtype=torch.float32)
        grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        # Whole tumour: radii 20-35% of the image, centred far enough from the border to fit.
        r_wt = uniform(0.20, 0.35) * s
        aspect = uniform(0.75, 1.0)
        theta = uniform(0.0, math.pi)
        margin = r_wt + 1
        cy = margin + torch.rand(n, generator=gen) * (s - 1 - 2 * margin)
        cx = margin + torch.rand(n, generator=gen) * (s - 1 - 2 * margin)
        # Core: smaller, shifted by a random offset that keeps it inside the whole tumour, so the
        # flair outline does not reveal where the core is. Necrosis: centred in the core.
        r_tc = r_wt * uniform(0.55, 0.80)
        slack = (r_wt * aspect - r_tc).clamp_min(0.0)
        offset = slack * torch.rand(n, generator=gen)
        phi = uniform(0.0, 2 * math.pi)
        ty, tx = cy + offset * phi.sin(), cx + offset * phi.cos()
        r_ncr = r_tc * uniform(0.35, 0.60)
        wt = self._ellipse(grid_y, grid_x, cy, cx, r_wt * aspect, r_wt, theta)
        tc = self._ellipse(grid_y, grid_x, ty, tx, r_tc * aspect, r_tc, theta)
        ncr = self._ellipse(grid_y, grid_x, ty, tx, r_ncr * aspect, r_ncr, theta)
        label = torch.zeros(n, s, s, dtype=torch.long)
        label[wt] = 2  # edema: whole tumour outside the core
        label[tc] = 3  # enhancing ring: core outside the necrosis
        label[ncr] = 1  # necrotic centre
        wt_f, et_f, ncr_f, tc_f = wt.float(), (label == 3).float(), ncr.float(), tc.float()
        ed_f = (label == 2).float()

        def modality(signal: Tensor) -> Tensor:
            noisy = (
                signal
                + c.background * self._smooth_field(n, gen)
                + c.noise * torch.randn(n, s, s, generator=gen)
            )
            return noisy.unsqueeze(1)  # (n, 1, S, S)

        flair = modality(c.flair_contrast * wt_f)
        texture = _random_sign(gen, n, s, s)  # edema in t1ce: more variance, same mean
        t1ce = modality(
            c.t1ce_et_contrast * et_f - c.t1ce_ncr_contrast * ncr_f + c.t1ce_ed_texture * texture * ed_f
        )
        t1 = modality(-c.t1_contrast * tc_f)
        t2 = modality(c.t2_contrast * wt_f)
        return {"flair": flair, "t1ce": t1ce, "t1": t1, "t2": t2, "target": label}

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
