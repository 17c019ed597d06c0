"""``mses``: Modality-Specific Early Stopping (Fujimori, Endo, Kawai, Mochizuki, "Modality-specific
learning rate control for multimodal classification", ACPR 2019; as re-implemented in
lihong2303/AGM_ICCV2023 ``run/*_main.py``).

After every epoch, each modality's unimodal validation loss is smoothed
(``L̃_m = 0.6 * L_m(e-1) + 0.4 * L_m(e)``, the previous *raw* loss, as the code does). When a
modality's smoothed loss has not improved for more than ``patience`` epochs, its learning rate
becomes 0 for the rest of the run and its parameters are restored to its best epoch. The other
modalities keep training.

No official code. Unimodal losses come from heads on detached features (the re-implementation
reads its additive late-fusion branches); a stopped encoder is frozen (its gradients are dropped,
so momentum and weight decay do not move it either) and, by default, only that modality is
restored (the re-implementation reloads the whole model and optimizer). Details in ``methods/mses.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmbalance.balancer import EpochContext, OptimizerFactory, StepContext
from mmbalance.config import need
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import scale_grads_
from mmbalance.methods._validation_heads import ValidationHeadsBalancer
from mmbalance.models.base import MultimodalModel
from mmbalance.tasks import Task

__all__ = ["MSES", "MSESConfig", "mses_step"]


@dataclass(frozen=True)
class MSESConfig(HeadConfig):
    # epochs without a new best smoothed val loss before a modality stops (AGM code: AVMNIST 10)
    patience: int = 10
    # weight of the current val loss; 1 - smoothing goes to the previous epoch's raw loss
    smoothing: float = 0.4
    # on stop, reload: modality (its encoder + head at its best epoch) | model (all, as AGM) | none
    restore: Literal["modality", "model", "none"] = "modality"
    # freeze: drop the stopped encoder's gradients; zero: multiply them by 0 (AGM code)
    stop_mode: Literal["freeze", "zero"] = "freeze"
    head_hidden: int | None = None  # unimodal loss heads: linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # unimodal loss heads' learning rate (None = the run's lr)

    def check(self) -> None:
        need(self, self.patience >= 0, "patience", "an integer >= 0")
        need(self, 0 < self.smoothing <= 1, "smoothing", "in (0, 1]")


def mses_step(
    raw: float,
    previous_raw: float | None,
    best: float,
    best_epoch: int,
    epoch: int,
    *,
    smoothing: float,
    patience: int,
) -> tuple[float, float, int, bool, bool]:
    """One modality's early-stopping update after epoch ``epoch``.

    Returns ``(smoothed, best, best_epoch, improved, stop)``: ``smoothed = (1 - smoothing) *
    previous_raw + smoothing * raw`` (``raw`` on the first epoch); a strictly lower smoothed loss is
    a new best; ``stop`` when ``epoch - best_epoch > patience``.
    """
    smoothed = raw if previous_raw is None else (1 - smoothing) * previous_raw + smoothing * raw
    improved = smoothed < best
    if improved:
        best, best_epoch = smoothed, epoch
    return smoothed, best, best_epoch, improved, epoch - best_epoch > patience


@register_method("mses")
class MSES(ValidationHeadsBalancer):
    """Stop each modality's training once its smoothed unimodal validation loss stops improving."""

    Config = MSESConfig
    grad_edit_scope = frozenset({"encoders"})
    presets = {
        # Patience of the AGM_ICCV2023 re-implementation (run/*_main.py), by dataset.
        "avmnist": {"patience": 10},
        "urfunny": {"patience": 30},
        "cremad": {"patience": 80},
        # Not from the paper: patience scaled to the 8-epoch synthetic benchmark.
        "synthetic": {"patience": 2},
    }
    paper = "Fujimori et al., ACPR 2019"

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._params = {m: model.modality_parameters(m) for m in self.modalities}
        k = len(self.modalities)
        # No NaN sentinels (state dicts compare with torch.equal): `measured` says which are set.
        self.register_buffer("measured", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("val_loss", torch.zeros(k, dtype=torch.float64))  # last raw unimodal val loss
        self.register_buffer("smoothed_loss", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("best_loss", torch.full((k,), float("inf"), dtype=torch.float64))
        self.register_buffer("best_epoch", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("stopped", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("stopped_at", torch.full((k,), -1, dtype=torch.long))
        # m -> {"model" | "encoder" | "head": state at m's best epoch}
        self._snapshots: dict[str, dict[str, dict[str, Tensor]]] = {}

    # -- epoch level ------------------------------------------------------------------------------
    def on_unimodal_validation(
        self, ctx: EpochContext, epoch: int, stats: dict[str, tuple[float, float]]
    ) -> None:
        """Smooth each running modality's validation loss of epoch ``epoch``; snapshot new bests; stop
        and restore modalities whose patience ran out."""
        cfg: MSESConfig = self.config
        for i, m in enumerate(self.modalities):
            if bool(self.stopped[i]):
                continue
            raw = stats[m][0]
            smoothed, best, best_epoch, improved, stop = mses_step(
                raw,
                float(self.val_loss[i]) if bool(self.measured[i]) else None,
                float(self.best_loss[i]),
                int(self.best_epoch[i]),
                epoch,
                smoothing=cfg.smoothing,
                patience=cfg.patience,
            )
            self.measured[i] = True
            self.val_loss[i] = raw
            self.smoothed_loss[i] = smoothed
            self.best_loss[i] = best
            self.best_epoch[i] = best_epoch
            if improved and cfg.restore != "none":
                self._snapshots[m] = self._snapshot(ctx.model, m)
            if stop:
                self.stopped[i] = True
                self.stopped_at[i] = epoch
                if cfg.restore != "none" and m in self._snapshots:
                    self._restore(ctx.model, m)

    def _snapshot(self, model: MultimodalModel, m: str) -> dict[str, dict[str, Tensor]]:
        def clone(module: nn.Module) -> dict[str, Tensor]:
            return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, Tensor)}

        snap = {"head": clone(self.heads.heads[m])}
        if self.config.restore == "model":
            snap["model"] = clone(model)
        else:
            snap["encoder"] = clone(model.encoders[m])
        return snap

    @torch.no_grad()
    def _restore(self, model: MultimodalModel, m: str) -> None:
        snap = self._snapshots.pop(m)
        if "model" in snap:
            model.load_state_dict(snap["model"])
        else:
            model.encoders[m].load_state_dict(snap["encoder"])
        self.heads.heads[m].load_state_dict(snap["head"])

    # -- step level -------------------------------------------------------------------------------
    @torch.no_grad()
    def on_after_backward(self, ctx: StepContext) -> None:
        """A stopped modality's encoder gets no update: gradients dropped (freeze) or zeroed."""
        for m, stopped in zip(self.modalities, self.host_values("stopped"), strict=True):
            if not stopped:
                continue
            if self.config.stop_mode == "freeze":
                for p in self._params[m]:
                    p.grad = None
            else:
                scale_grads_(self._params[m], 0.0)

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, m in enumerate(self.modalities):
            measured = bool(self.measured[i])
            out[f"val_loss/{m}"] = float(self.val_loss[i]) if measured else math.nan
            out[f"smoothed/{m}"] = float(self.smoothed_loss[i]) if measured else math.nan
            out[f"stopped/{m}"] = float(self.stopped[i])
            out[f"stopped_at/{m}"] = float(self.stopped_at[i])
        return out
