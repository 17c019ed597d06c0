"""The generative processes of the synthetic datasets and their parameters (the dataset Configs).

Pure functions of a Config, a sample count and a private ``torch.Generator``: they draw the
"world" (prototypes, directions) and then every sample, in a fixed order, so one seed always gives
the same tensors. :mod:`mmbalance.datasets.synthetic` serves them as registered datasets and
explains the planted imbalance they share.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import ConfigBase

__all__ = [
    "SyntheticConfig",
    "Cls2Config",
    "Cls3Config",
    "Reg3Config",
    "Seg4Config",
    "unit_rows",
    "orthonormal_rows",
    "random_sign",
    "generate_cls2",
    "redundant_view",
    "generate_reg3",
    "ellipse_masks",
    "smooth_field",
    "generate_seg4",
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


# -- shared draws ----------------------------------------------------------------------------------
def unit_rows(gen: torch.Generator, k: int, dim: int) -> Tensor:
    """``k`` random unit vectors in R^dim, shape (k, dim)."""
    v = torch.randn(k, dim, generator=gen)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def orthonormal_rows(gen: torch.Generator, k: int, dim: int) -> Tensor:
    """``k <= dim`` orthonormal random vectors in R^dim, shape (k, dim)."""
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    return q.T.contiguous()


def random_sign(gen: torch.Generator, *shape: int) -> Tensor:
    """Independent random signs ±1 (float32) of the given shape."""
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


# -- classification ---------------------------------------------------------------------------------
def generate_cls2(c: Cls2Config, n: int, gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """``synthetic_cls2``: ``({"strong": (n, d_s), "weak": (n, d_w), "target": (n,) int64}, coarse)``;
    ``coarse`` (n,) is the coarse label c, for views drawn after these (:func:`redundant_view`)."""
    mu = unit_rows(gen, c.coarse_classes, c.strong_dim)  # coarse prototypes of the strong view
    directions = orthonormal_rows(gen, c.coarse_classes + c.fine_classes, c.weak_dim)
    v, w = directions[: c.coarse_classes], directions[c.coarse_classes :]
    coarse = torch.randint(0, c.coarse_classes, (n,), generator=gen)
    fine = torch.randint(0, c.fine_classes, (n,), generator=gen)
    y = coarse * c.fine_classes + fine
    strong = c.strong_signal * mu[coarse] + c.strong_noise * torch.randn(n, c.strong_dim, generator=gen)
    weak = c.weak_signal * (random_sign(gen, n, 1) * v[coarse] + random_sign(gen, n, 1) * w[fine])
    weak = weak + c.weak_noise * torch.randn(n, c.weak_dim, generator=gen)
    return {"strong": strong, "weak": weak, "target": y}, coarse


def redundant_view(c: Cls3Config, n: int, gen: torch.Generator, coarse: Tensor) -> Tensor:
    """``synthetic_cls3``'s ``redundant`` view (n, d_r): its own coarse prototypes, lower signal."""
    mu_r = unit_rows(gen, c.coarse_classes, c.redundant_dim)
    noise = c.redundant_noise * torch.randn(n, c.redundant_dim, generator=gen)
    return c.redundant_signal * mu_r[coarse] + noise


# -- regression ----------------------------------------------------------------------------------
def generate_reg3(c: Reg3Config, n: int, gen: torch.Generator) -> dict[str, Tensor]:
    """``synthetic_reg3``: ``text`` (n, L, d_t), ``audio`` (n, L, d_a), ``vision`` (n, L, d_v) and
    ``target`` (n,) in [-3, 3]."""
    u_t = unit_rows(gen, 1, c.text_dim)[0]
    uv_a = orthonormal_rows(gen, 3, c.audio_dim)
    u_v = unit_rows(gen, 1, c.vision_dim)[0]
    a = torch.rand(n, generator=gen) * 2 - 1
    b = torch.rand(n, generator=gen) * 2 - 1
    target = c.text_weight * a + (3.0 - c.text_weight) * b
    L = c.seq_len
    text = (a * c.text_signal)[:, None, None] * u_t + c.text_noise * torch.randn(
        n, L, c.text_dim, generator=gen
    )
    gain = random_sign(gen, n, L, 1)
    pattern = uv_a[0] + a[:, None] * uv_a[1] + b[:, None] * uv_a[2]  # (n, d_a): tilts a and b
    audio = c.audio_signal * gain * pattern[:, None, :] + c.audio_noise * torch.randn(
        n, L, c.audio_dim, generator=gen
    )
    vision = (a * c.vision_signal)[:, None, None] * u_v + c.vision_noise * torch.randn(
        n, L, c.vision_dim, generator=gen
    )
    return {"text": text, "audio": audio, "vision": vision, "target": target}


# -- segmentation --------------------------------------------------------------------------------
def ellipse_masks(
    grid_y: Tensor, grid_x: Tensor, cy: Tensor, cx: Tensor, ry: Tensor, rx: Tensor, theta: Tensor
) -> Tensor:
    """Boolean masks (n, S, S) of rotated ellipses; every argument but the grids is (n,)."""
    dy = grid_y[None] - cy[:, None, None]
    dx = grid_x[None] - cx[:, None, None]
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u = (dx * cos + dy * sin) / rx[:, None, None]
    v = (-dx * sin + dy * cos) / ry[:, None, None]
    return u.square() + v.square() <= 1.0


def smooth_field(n: int, size: int, gen: torch.Generator) -> Tensor:
    """(n, S, S) smooth random background: 4x4 noise upsampled bilinearly, unit-ish std."""
    coarse = torch.randn(n, 1, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def generate_seg4(c: Seg4Config, n: int, gen: torch.Generator) -> dict[str, Tensor]:
    """``synthetic_seg4``: ``flair``, ``t1ce``, ``t1``, ``t2`` (n, 1, S, S) and ``target`` (n, S, S)
    int64 labels 0 bg / 1 NCR / 2 ED / 3 ET."""
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
    wt = ellipse_masks(grid_y, grid_x, cy, cx, r_wt * aspect, r_wt, theta)
    tc = ellipse_masks(grid_y, grid_x, ty, tx, r_tc * aspect, r_tc, theta)
    ncr = ellipse_masks(grid_y, grid_x, ty, tx, r_ncr * aspect, r_ncr, theta)
    label = torch.zeros(n, s, s, dtype=torch.long)
    label[wt] = 2  # edema: whole tumour outside the core
    label[tc] = 3  # enhancing ring: core outside the necrosis
    label[ncr] = 1  # necrotic centre
    wt_f, et_f, ncr_f, tc_f = wt.float(), (label == 3).float(), ncr.float(), tc.float()
    ed_f = (label == 2).float()

    def modality(signal: Tensor) -> Tensor:
        noisy = (
            signal + c.background * smooth_field(n, s, gen) + c.noise * torch.randn(n, s, s, generator=gen)
        )
        return noisy.unsqueeze(1)  # (n, 1, S, S)

    flair = modality(c.flair_contrast * wt_f)
    texture = random_sign(gen, n, s, s)  # edema in t1ce: more variance, same mean
    t1ce = modality(
        c.t1ce_et_contrast * et_f - c.t1ce_ncr_contrast * ncr_f + c.t1ce_ed_texture * texture * ed_f
    )
    t1 = modality(-c.t1_contrast * tc_f)
    t2 = modality(c.t2_contrast * wt_f)
    return {"flair": flair, "t1ce": t1ce, "t1": t1, "t2": t2, "target": label}
