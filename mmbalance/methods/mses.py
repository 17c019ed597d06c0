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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.methods import register_method
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._stages import isolated_rng, target_size, unimodal_validation
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["MSES", "MSESConfig", "mses_step"]

RESTORE = ("modality", "model", "none")
STOP_MODES = ("freeze", "zero")


@dataclass(frozen=True)
class MSESConfig:
    patience: int = 10  # epochs without a new best smoothed val loss before a modality stops (AGM code: AVMNIST 10)
    smoothing: float = 0.4  # weight of the current val loss; 1 - smoothing goes to the previous epoch's raw loss
    restore: str = "modality"  # on stop, reload: modality (its encoder + head at its best epoch) | model (all, as AGM) | none
    stop_mode: str = "freeze"  # freeze: drop the stopped encoder's gradients; zero: multiply them by 0 (AGM code)
    head_hidden: int | None = None  # unimodal loss heads: linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # unimodal loss heads' learning rate (None = the run's lr)

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not (0 < self.smoothing <= 1):
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        if self.restore not in RESTORE:
            raise ValueError(f"restore must be one of {RESTORE}, got {self.restore!r}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {self.stop_mode!r}")
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise ValueError(f"head_hidden must be None or an integer >= 1, got {self.head_hidden!r}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr must be None or > 0, got {self.head_lr!r}")


def mses_step(
    raw: float, previous_raw: float | None, best: float, best_epoch: int, epoch: int, *, smoothing: float, patience: int
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
class MSES(Balancer):
    """Stop each modality's training once its smoothed unimodal validation loss stops improving."""

    Config = MSESConfig
    tasks = frozenset({"cls", "reg", "seg"})
    grad_edit_scope = frozenset({"encoders"})
    paper = "Fujimori, Endo, Kawai, Mochizuki. Modality-specific learning rate control for multimodal classification. ACPR 2019"
    presets = {
        # Patience of the AGM_ICCV2023 re-implementation (run/*_main.py), by dataset.
        "avmnist": {"patience": 10},
        "urfunny": {"patience": 30},
        "cremad": {"patience": 80},
        # Not from the paper: patience scaled to the 8-epoch synthetic benchmark.
        "synthetic": {"patience": 2},
    }

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg = self.config
        self._params: dict[str, list[nn.Parameter]] = {m: model.modality_parameters(m) for m in self.modalities}
        # The heads own their optimizer, created when they are built (also from a loaded state).
        self.heads = UnimodalHeads.for_task(self.modalities, task, hidden=cfg.head_hidden, detach=True,
                                            optimizer_factory=optimizer_factory, lr=cfg.head_lr)
        k = len(self.modalities)
        # No NaN sentinels (state dicts compare with torch.equal): `measured` says which are set.
        self.register_buffer("measured", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("val_loss", torch.zeros(k, dtype=torch.float64))  # last raw unimodal val loss
        self.register_buffer("smoothed_loss", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("best_loss", torch.full((k,), float("inf"), dtype=torch.float64))
        self.register_buffer("best_epoch", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("stopped", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("stopped_at", torch.full((k,), -1, dtype=torch.long))
        self._snapshots: dict[str, dict[str, dict[str, Tensor]]] = {}  # m -> {"model"|"encoder"|"head": state}
        self._host_stopped: list[str] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_host_state())

    def _forget_host_state(self) -> None:
        self._host_stopped = None

    def _stopped(self) -> list[str]:
        """Host list of stopped modalities; read once per epoch (or after a state-dict load)."""
        if self._host_stopped is None:
            flags = self.stopped.tolist()
            self._host_stopped = [m for m, s in zip(self.modalities, flags, strict=True) if s]
        return self._host_stopped

    # -- epoch level ------------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Score the epoch just finished (``ctx.epoch - 1``) on validation; snapshot new bests; stop
        and restore modalities whose patience ran out."""
        self._host_stopped = None
        if ctx.epoch < 1 or not self.heads.built:
            return
        cfg = self.config
        with isolated_rng(ctx.device):
            stats = unimodal_validation(ctx.model, self.heads, ctx.val_loader, ctx.task, ctx.to_device, self.modalities)
        finished = ctx.epoch - 1
        for i, m in enumerate(self.modalities):
            if bool(self.stopped[i]):
                continue
            raw = stats[m][0]
            smoothed, best, best_epoch, improved, stop = mses_step(
                raw,
                float(self.val_loss[i]) if bool(self.measured[i]) else None,
                float(self.best_loss[i]),
                int(self.best_epoch[i]),
                finished,
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
                self.stopped_at[i] = finished
                if cfg.restore != "none" and m in self._snapshots:
                    self._restore(ctx.model, m)
        self._host_stopped = None

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
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """Task loss and the unimodal heads' losses on detached features (they reach only the heads)."""
        terms = {"task": task.loss(output.prediction, batch["target"])}
        predictions = self.heads(output.features, target_size(batch))
        for m in self.modalities:
            terms[f"probe/{m}"] = task.loss(predictions[m], batch["target"])
        return terms

    @torch.no_grad()
    def on_after_backward(self, ctx: StepContext) -> None:
        """A stopped modality's encoder gets no update: gradients dropped (freeze) or zeroed."""
        for m in self._stopped():
            if self.config.stop_mode == "freeze":
                for p in self._params[m]:
                    p.grad = None
            else:
                grads = [p.grad for p in self._params[m] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, 0.0)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the unimodal heads' own optimizer (built with the heads)."""
        self.heads.step(ctx.scaler)

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, m in enumerate(self.modalities):
            measured = bool(self.measured[i])
            out[f"val_loss/{m}"] = float(self.val_loss[i]) if measured else math.nan
            out[f"smoothed/{m}"] = float(self.smoothed_loss[i]) if measured else math.nan
            out[f"stopped/{m}"] = float(self.stopped[i])
            out[f"stopped_at/{m}"] = float(self.stopped_at[i])
        return out
