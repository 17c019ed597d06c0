"""``mrd``: Modality Random Dropout, the "MRD" baseline of the CGGM comparison tables.

During training, whole modalities are removed per sample: their encoder features are zeroed before
fusion, so the fusion and head must also predict from the remaining modalities and every encoder
keeps receiving gradient from samples where the dominant modality is absent. Evaluation uses all
modalities, unscaled.

No official implementation exists; CGGM (Guo et al., NeurIPS 2024, §4.3) lists "Modality Random
Dropout (MRD)" without code. We implement the two standard forms (details and sources in
``methods/mrd.md``): ``mode="one"`` (per sample, with probability p one modality chosen uniformly
is dropped; never all) and ``mode="independent"`` (ModDrop, Neverova et al. TPAMI 2016: each
modality dropped independently with probability p; a sample that lost all of them gets one back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer
from mmbalance.config import need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["MRD", "MRDConfig", "modality_keep_mask", "MODES"]

Mode = Literal["one", "independent"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class MRDConfig(MethodConfig):
    p: float = 0.5  # drop probability per sample ("one": of dropping one modality; "independent": of each)
    mode: Mode = "one"  # one uniformly chosen modality, or ModDrop (at least one kept)

    def check(self) -> None:
        need(self, 0.0 <= self.p <= 1.0, "p", "in [0, 1]")


def modality_keep_mask(
    batch_size: int,
    num_modalities: int,
    p: float,
    mode: str,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean ``(B, M)`` mask of kept modalities; every row keeps at least one modality.

    * ``"one"``: with probability p a uniformly chosen modality is dropped, so
      ``P(m dropped) = p / M``;
    * ``"independent"``: each modality is dropped with probability p; a row with all dropped gets
      one uniformly chosen modality back, so ``P(m dropped) = p − p^M / M``.
    """
    if num_modalities < 2:
        raise ConfigError(f"modality dropout needs at least 2 modalities, got {num_modalities}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    kw: dict[str, Any] = {"device": device, "generator": generator}
    pick = F.one_hot(torch.randint(num_modalities, (batch_size,), **kw), num_modalities).bool()
    if mode == "one":
        dropped = (torch.rand(batch_size, **kw) < p)[:, None] & pick
        return ~dropped
    keep = torch.rand(batch_size, num_modalities, **kw) >= p
    none_left = ~keep.any(dim=1, keepdim=True)
    return keep | (none_left & pick)


@register_method("mrd")
class MRD(Balancer):
    """Per-sample modality dropout at the fusion input (training only)."""

    Config = MRDConfig
    paper = "baseline of Guo et al., NeurIPS 2024; ModDrop, Neverova et al., TPAMI 2016"

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encode, zero each sample's dropped modality features, fuse. ``output.features`` keeps the
        un-dropped encoder outputs. With ``p == 0`` this is exactly ``model(batch)``."""
        if self.config.p == 0.0:
            return model(batch)
        features, extras = model.encode(batch)
        first = features[self.modalities[0]]
        keep = modality_keep_mask(
            first.shape[0], len(self.modalities), self.config.p, self.config.mode, first.device
        )
        masked = {}
        for i, m in enumerate(self.modalities):
            f = features[m]
            masked[m] = f * keep[:, i].reshape((-1,) + (1,) * (f.dim() - 1)).to(f.dtype)
        out = model.fuse(masked, extras)
        out.features = features
        # per-step counts; their epoch means' ratio is the per-sample drop rate (partial batches too)
        self.epoch_means.update(
            dropped=(~keep).sum(dim=0), samples=torch.full((), keep.shape[0], device=keep.device)
        )
        return out

    def diagnostics(self) -> dict[str, float]:
        """Fraction of training samples in the epoch whose modality m was dropped."""
        means = self.epoch_means.pop()
        if not means:
            return {}
        return {f"dropped/{m}": means[f"dropped/{m}"] / means["samples"] for m in self.modalities}
