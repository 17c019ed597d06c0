"""``mslr``: Modality-Specific Learning Rates (Yao & Mihalcea, "Modality-specific Learning Rates for
Effective Multimodal Additive Late-fusion", Findings of ACL 2022).

Each modality's encoder trains with its own learning rate ``lr_m = c_m * lr``. ``keep``: ``c_m`` are
fixed (the ratio of the modality's unimodally tuned LR to the global LR). ``dynamic`` (the
AGM_ICCV2023 re-implementation, ``run/*_main.py``): after each epoch,
``c_m = c_m^0 * s_m / mean(s_m over the previous `window` epochs)``, with ``s_m`` the validation score
of a unimodal head on modality m's features.

No official code exists. The per-modality LR is applied exactly, for any optimizer, by scaling the
modality's parameter update (``θ ← θ_old + c_m (θ_new − θ_old)``); the re-implementation's gradient
scaling (``apply="grad"``) is kept as an option, but it is a no-op under Adam. Validation split, never
test. Details in ``methods/mslr.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import scale_grads_
from mmbalance.methods._validation_heads import ValidationHeadsBalancer
from mmbalance.models.base import MultimodalModel
from mmbalance.tasks import Task

__all__ = ["MSLR", "MSLRConfig", "dynamic_ratios"]


@dataclass(frozen=True)
class MSLRConfig(HeadConfig):
    # keep: fixed c_m; dynamic: c_m = c_m^0 * s_m / mean(last `window` s_m) (AGM re-implementation)
    strategy: Literal["keep", "dynamic"] = "dynamic"
    # c_m^0 per modality (unimodal-tuned LR / lr); a missing modality has 1
    lr_scale: Mapping[str, float] = field(default_factory=dict)
    window: int = 5  # epochs in the moving mean of the dynamic strategy (AGM code: 5)
    # lr: scale the modality's parameter update (exact per-modality LR); grad: scale its gradient
    apply: Literal["lr", "grad"] = "lr"
    head_hidden: int | None = None  # unimodal score heads: linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # unimodal score heads' learning rate (None = the run's lr)

    def check(self) -> None:
        for key, c in self.lr_scale.items():
            if not (finite(c) and c >= 0):
                raise ValueError(f"lr_scale[{key!r}] must be a finite number >= 0, got {c!r}")
        need(self, self.window >= 1, "window", "an integer >= 1")


def dynamic_ratios(current: Sequence[float], history: Sequence[Sequence[float]]) -> list[float]:
    """``ratio_m = current_m / mean_k history[k][m]`` (AGM code: ``acc / np.mean(memory)``).

    A modality whose history mean is not positive (score 0 so far) keeps ratio 1 rather than
    dividing by zero.
    """
    if not history:
        raise ConfigError("history must hold at least one epoch of scores, got none")
    out = []
    for m, s in enumerate(current):
        mean = sum(row[m] for row in history) / len(history)
        out.append(s / mean if mean > 0 else 1.0)
    return out


@register_method("mslr")
class MSLR(ValidationHeadsBalancer):
    """Per-modality learning-rate multipliers, fixed or adapted from unimodal validation scores."""

    Config = MSLRConfig
    grad_edit_scope = frozenset({"encoders"})
    paper = "Yao and Mihalcea, Findings of ACL 2022"
    presets = {
        # Initial multipliers of the AGM_ICCV2023 re-implementation (run/*_main.py), by dataset.
        "cremad": {"lr_scale": {"audio": 0.9, "visual": 1.1}},
        "avmnist": {"lr_scale": {"audio": 1.3, "visual": 0.7}},
        "urfunny": {"lr_scale": {"audio": 0.9, "visual": 1.4, "text": 0.7}},
        # Not from the paper: a window that fits the 8-epoch synthetic benchmark.
        "synthetic": {"window": 2},
    }

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        cfg: MSLRConfig = self.config
        unknown = set(cfg.lr_scale) - set(model.modalities)
        if unknown:
            raise ConfigError(
                f"lr_scale names unknown modalities {sorted(unknown)}; the model has {list(model.modalities)}"
            )
        if cfg.strategy == "dynamic" and getattr(task, "score_name", None) == "neg_mae":
            raise UnsupportedError(
                "mslr strategy='dynamic' divides validation scores and needs a non-negative score; "
                "the regression task uses score='neg_mae', expected 'sign_acc'"
            )
        super().setup(model, task, optimizer_factory)
        self._params = {m: model.modality_parameters(m) for m in self.modalities}
        initial = [float(cfg.lr_scale.get(m, 1.0)) for m in self.modalities]
        self.register_buffer("initial_scale", torch.tensor(initial, dtype=torch.float64))
        self.register_buffer("coefficients", torch.tensor(initial, dtype=torch.float64))
        history = torch.zeros(cfg.window, len(self.modalities), dtype=torch.float64)
        self.register_buffer("score_history", history)  # the last `window` epochs' scores, oldest first
        self.register_buffer("history_len", torch.zeros((), dtype=torch.long))
        self._before: dict[str, list[Tensor]] = {}

    def uses_heads(self) -> bool:
        """Score heads for the dynamic strategy only (fixed multipliers need no scores)."""
        return self.config.strategy == "dynamic"

    # -- epoch level ------------------------------------------------------------------------------
    def on_unimodal_validation(
        self, ctx: EpochContext, epoch: int, stats: dict[str, tuple[float, float]]
    ) -> None:
        """Dynamic strategy: the validation scores of epoch ``epoch`` update the window and ``c_m``."""
        self.update(torch.tensor([stats[m][1] for m in self.modalities], dtype=torch.float64))

    def update(self, scores: Tensor) -> None:
        """AGM rule: while fewer than ``window`` epochs are stored, store; else ``c_m = c_m^0 *
        s_m / mean(window)`` and slide the window by one."""
        n = int(self.history_len)
        window = self.config.window
        if n < window:
            self.score_history[n] = scores
            self.history_len += 1
            return
        ratios = dynamic_ratios(scores.tolist(), self.score_history.tolist())
        self.coefficients.copy_(self.initial_scale * torch.tensor(ratios, dtype=torch.float64))
        self.score_history.copy_(torch.cat([self.score_history[1:], scores.to(self.score_history)[None]]))

    # -- step level -------------------------------------------------------------------------------
    @torch.no_grad()
    def on_after_backward(self, ctx: StepContext) -> None:
        """``apply="grad"``: ``g_m *= c_m``; ``apply="lr"``: remember θ_m before the optimizer step."""
        for m, c in zip(self.modalities, self.host_values("coefficients"), strict=True):
            if c == 1.0:
                continue
            if self.config.apply == "grad":
                scale_grads_(self._params[m], c)
            else:
                if m not in self._before:  # allocated once, the first time c_m differs from 1
                    self._before[m] = [torch.empty_like(p) for p in self._params[m]]
                torch._foreach_copy_(self._before[m], self._params[m])

    @torch.no_grad()
    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """``apply="lr"``: ``θ_m ← θ_old + c_m (θ_new − θ_old)``; then step the score heads."""
        if self.config.apply == "lr":
            for m, c in zip(self.modalities, self.host_values("coefficients"), strict=True):
                if c != 1.0:
                    torch._foreach_lerp_(self._before[m], self._params[m], c)
                    torch._foreach_copy_(self._params[m], self._before[m])
        super().on_after_optimizer_step(ctx)

    def diagnostics(self) -> dict[str, float]:
        out = {f"coef/{m}": c for m, c in zip(self.modalities, self.host_values("coefficients"), strict=True)}
        n = int(self.history_len)
        if n:
            last = self.score_history[n - 1] if n < self.config.window else self.score_history[-1]
            out.update({f"val_score/{m}": float(last[i]) for i, m in enumerate(self.modalities)})
        return out
