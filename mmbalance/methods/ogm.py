"""``ogm``: On-the-fly Gradient Modulation, the journal form (Wei, Hu, Du, Wen, TPAMI 2024).

The TPAMI extension of OGM-GE (``ogm_ge``, CVPR 2022) keeps its arithmetic: per-modality confidence
scores ``s_u``, ratios ``ρ_u``, ``k_u = 1 − tanh(α ρ_u)`` for every modality with ``ρ_u > 1``, and
the encoder-gradient update ``g ← k_u g + N(0, std(g)²)`` (``--modulation OGM_GE``, the default of
the journal code). What the journal code adds, and this method changes relative to ``ogm_ge``:

* a warm-up: ``main.py`` never modulates in epochs 0-5 (``warm_up = epoch <= 5``), whatever
  ``--modulation_starts`` says, so the window here starts at epoch 6;
* the journal's defaults: α = 0.8 and modulation up to epoch 60 (``scripts/train_ogm.sh``);
* ``--use_OGM_plus`` (``plus=True``): instead of slowing the dominant modality, the gradients of the
  others (``ρ_u < 1``) are multiplied by ``plus_coeff`` (hard-coded 4 in ``main.py``).

Port of ``GeWu-Lab/BML_TPAMI2024:code/main.py`` (``train``). The ratios, coefficients and the
enhancement are ``ogm_ge``'s functions (the formulas agree); the deviations of ``ogm_ge`` (own
linear heads, every encoder parameter by default, pairwise ratios for M > 2, exp(−ℓ) scores for
regression and segmentation) apply unchanged. Details in ``methods/ogm.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmbalance.config import finite, need
from mmbalance.methods import register_method
from mmbalance.methods.ogm_ge import OGMGE, OGMGEConfig

__all__ = ["OGM", "OGMConfig", "plus_coefficients"]


@dataclass(frozen=True)
class OGMConfig(OGMGEConfig):
    alpha: float = 0.8  # α: k_u = 1 − tanh(α ρ_u) (train_ogm.sh --alpha 0.8; main.py default 1.0)
    modulation_starts: int = 6  # main.py: warm_up = epoch <= 5 blocks modulation (--modulation_starts 0)
    modulation_ends: int = 60  # last modulated epoch, inclusive (train_ogm.sh --modulation_ends 60)
    plus: bool = False  # --use_OGM_plus: boost the non-dominant modalities instead of slowing the dominant
    plus_coeff: float = 4.0  # gradient factor of the non-dominant modalities with plus=True (main.py: 4)

    def check(self) -> None:
        super().check()
        need(self, finite(self.plus_coeff) and self.plus_coeff > 0, "plus_coeff", "a finite number > 0")


def plus_coefficients(ratios: Tensor, plus_coeff: float) -> Tensor:
    """``--use_OGM_plus``: ``k_u = plus_coeff`` where ``ρ_u < 1`` (slower than the others), else 1."""
    return torch.where(ratios < 1, torch.full_like(ratios, plus_coeff), torch.ones_like(ratios))


@register_method("ogm")
class OGM(OGMGE):
    """Journal OGM: OGM-GE after a warm-up, with the journal defaults and the ``plus`` variant."""

    Config = OGMConfig
    presets = {
        # code/scripts/train_ogm.sh (Kinetics-Sounds, concat fusion; main.py warm-up of 6 epochs)
        "kinetics_sounds": {"alpha": 0.8, "modulation_starts": 6, "modulation_ends": 60},
        # Not from the paper: the 8-epoch synthetic benchmark, warm-up scaled from 6 of 100 epochs.
        "synthetic": {"modulation_starts": 1},
    }
    paper = "Wei et al., TPAMI 2024 (GeWu-Lab/BML_TPAMI2024)"

    def coefficients(self, ratios: Tensor) -> Tensor:
        """``ogm_ge``'s Eq. 10, or the ``plus`` boost of the non-dominant modalities."""
        if self.config.plus:
            return plus_coefficients(ratios, self.config.plus_coeff)
        return super().coefficients(ratios)
