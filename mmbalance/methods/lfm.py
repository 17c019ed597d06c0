"""``lfm``: Learning the modality gap dynamically (Yang, Wan, Jiang, Xu; NeurIPS 2024).

The supervised loss is combined with an unsupervised alignment of the modalities' predictions:
``L = 2 (α_cls · L_task + α_align · Σ_{a<b} JS(p_a, p_b))`` with ``p_m = softmax(f_m)`` of each
modality's head, ``JS(p, q) = ½ [KL(m ‖ p) + KL(m ‖ q)]``, ``m = ½ (p + q)``. The weights follow the
official closed-form schedule of the epoch (``weighting="fitted"``), are learned once per epoch by a
hypergradient step on half of the first validation batch (``"learned"``), or are constant
(``"fixed"``).

Port of ``njustkmg/NeurIPS24-LFM``: ``Crema_epoch.py`` (``Alignment``, ``getAlpha_Learnable_Fitted``,
``train_audio_video``) and ``Crema_epoch_learnable.py`` (``getAlpha_Learnable``); three or more
modalities sum the pairwise alignments (authors' answer in NeurIPS24-LFM#2). Deviations
(``methods/lfm.md``): the supervised term is the model's own fused prediction (the official model
fuses by ``½ (f_a + f_v)`` of its heads), and our heads also learn from their own task loss on
detached features; ``log p`` is a log-softmax; segmentation aligns every pixel.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._stages import isolated_rng, stage_loader, stage_seed, target_size
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = [
    "LFM", "LFMConfig", "alignment", "pairwise_alignment", "fitted_weights", "learned_alpha", "hypergradient",
]

# getAlpha_Learnable_Fitted: polynomials in the epoch, fitted to the learned α of a 200-epoch run.
FITTED_CLS = (
    2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11,
)
FITTED_ALIGN = (
    7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11,
)
FITTED_EPOCHS = 200  # the fitted range (epoch_dict in data/crema.json); outside it the polynomials diverge
ALPHA_RANGE = (0.05, 0.95)  # getAlpha_Learnable: α_align clipped to [0.05, 0.95]
HALVE_EVERY = 20  # getAlpha_Learnable: lr_alpha halved at epochs 20, 40, ...


@dataclass(frozen=True)
class LFMConfig(HeadConfig):
    weighting: Literal["fitted", "learned", "fixed"] = "fitted"  # Crema_epoch.py: fitted;
    # Crema_epoch_learnable.py: learned; fixed: constant α_align
    alpha: float = 0.95  # α_align: initial for "learned" (cls_k = [0.05, 0.95]), the constant for "fixed"
    lr_alpha: float = 1e-4  # step size of the α update ("learned"; Crema_epoch_learnable.py lr_alpha)
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's)
    head_hidden: int | None = None  # None: linear heads (official cls_a, cls_v are nn.Linear)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, finite(self.alpha) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]")
        if self.weighting == "learned":
            lo, hi = ALPHA_RANGE
            need(self, lo <= self.alpha <= hi, "alpha", f"in [{lo}, {hi}] for weighting='learned'")
        need(self, finite(self.lr_alpha) and self.lr_alpha >= 0, "lr_alpha", "a finite number >= 0")


# -- the arithmetic (hand-checked in tests/methods/test_lfm.py) -----------------------------------
def _alignment_of_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    mix = 0.5 * (log_p.exp() + log_q.exp())
    kl_p = F.kl_div(log_p, mix, reduction="none").sum(dim=1).mean()  # KL(mix || p), mean over positions
    kl_q = F.kl_div(log_q, mix, reduction="none").sum(dim=1).mean()
    return 0.5 * (kl_p + kl_q)


def alignment(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Official ``Alignment``: ``½ [KL(m ‖ p) + KL(m ‖ q)]``, ``m = ½ (p + q)``, with p, q the softmax
    over the class dimension 1 of ``(B, K)`` or ``(B, K, H, W)`` logits, averaged over the positions
    (samples, or every pixel): ``F.kl_div(p.log(), m, reduction="batchmean")`` for ``(B, K)``, with a
    log-softmax for ``p.log()``."""
    log_p, log_q = F.log_softmax(logits_p.float(), dim=1), F.log_softmax(logits_q.float(), dim=1)
    return _alignment_of_log_probs(log_p, log_q)


def pairwise_alignment(logits: Sequence[Tensor]) -> Tensor:
    """``Σ_{a<b} alignment(f_a, f_b)`` over all modality pairs (each log-softmax computed once)."""
    if len(logits) < 2:
        raise ConfigError(f"LFM aligns at least 2 modalities, got {len(logits)}")
    log_probs = [F.log_softmax(z.float(), dim=1) for z in logits]
    total = None
    for i, j in itertools.combinations(range(len(log_probs)), 2):
        term = _alignment_of_log_probs(log_probs[i], log_probs[j])
        total = term if total is None else total + term
    assert total is not None
    return total


def fitted_weights(epoch: int) -> tuple[float, float]:
    """``(α_cls, α_align)`` of the official fitted schedule at ``epoch`` (0-based)."""
    return (
        sum(c * epoch**i for i, c in enumerate(FITTED_CLS)),
        sum(c * epoch**i for i, c in enumerate(FITTED_ALIGN)),
    )


def learned_alpha(
    alpha_align: float, lr_alpha: float, alpha_grad: float, epoch: int
) -> tuple[float, float, float]:
    """One official α update: halve ``lr_alpha`` at epochs 20, 40, ...; ``α_align −= lr_alpha ·
    alpha_grad``, clipped to [0.05, 0.95]; ``α_cls = 1 − α_align``. Returns
    ``(α_cls, α_align, lr_alpha)``."""
    if epoch % HALVE_EVERY == 0 and epoch != 0:
        lr_alpha = lr_alpha / 2
    lo, hi = ALPHA_RANGE
    alpha_align = max(lo, min(hi, alpha_align - lr_alpha * alpha_grad))
    return 1.0 - alpha_align, alpha_align, lr_alpha


def hypergradient(
    supervised: Tensor, aligned: Tensor, alpha_cls: float, alpha_align: float, params: Sequence[Tensor]
) -> Tensor:
    """The official ``alpha_grad``: the mean of ``(H g)`` over the first parameter tensor, where H is the
    Hessian of ``α_cls · supervised + α_align · aligned`` and ``g = ∇ supervised``, both with respect
    to ``params`` (``getAlpha_Learnable``'s ``hessian_vector_prod[0].mean()``). A 0-d tensor; 0 when
    the first parameter does not reach the losses.
    """
    total = alpha_cls * supervised + alpha_align * aligned
    theta = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    cls = torch.autograd.grad(supervised, params, retain_graph=True, allow_unused=True)
    pairs = [
        (t, g) for t, g in zip(theta, cls, strict=True) if t is not None and g is not None and t.requires_grad
    ]
    if not pairs:
        return torch.zeros((), device=params[0].device)
    (hvp,) = torch.autograd.grad(
        [t for t, _ in pairs], [params[0]], grad_outputs=[g for _, g in pairs], allow_unused=True
    )
    return torch.zeros((), device=params[0].device) if hvp is None else hvp.float().mean()


@register_method("lfm")
class LFM(HeadedBalancer):
    """LFM: task loss plus a weighted alignment of the modalities' predicted class distributions."""

    Config = LFMConfig
    presets = {"cremad": {"weighting": "fitted"}}  # README: python Crema_epoch.py
    tasks = frozenset({"cls", "seg"})
    paper = "Yang et al., NeurIPS 2024 (njustkmg/NeurIPS24-LFM)"
    heads_detach = False  # the alignment reaches the encoders through the heads

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: LFMConfig = self.config
        self._alpha_cls, self._alpha_align = 1.0 - cfg.alpha, cfg.alpha
        self._lr_alpha = cfg.lr_alpha

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Set this epoch's (α_cls, α_align): the fitted schedule, or one hypergradient step."""
        cfg: LFMConfig = self.config
        if cfg.weighting == "fitted":
            if ctx.num_epochs > FITTED_EPOCHS:
                raise ConfigError(
                    f"lfm weighting='fitted' is fitted on epochs 0-{FITTED_EPOCHS - 1}, the run has "
                    f"{ctx.num_epochs} epochs; use weighting='learned' or 'fixed'"
                )
            self._alpha_cls, self._alpha_align = fitted_weights(ctx.epoch)
        elif cfg.weighting == "learned":
            grad = self._alpha_gradient(ctx)
            self._alpha_cls, self._alpha_align, self._lr_alpha = learned_alpha(
                self._alpha_align, self._lr_alpha, grad, ctx.epoch
            )

    def _alpha_gradient(self, ctx: EpochContext) -> float:
        """The official ``alpha_grad`` on the first half of the first validation batch (train mode, as
        the official; outside the main RNG stream; the model's buffers, e.g. BatchNorm running
        statistics, restored afterwards so that validation data stays out of the model's state). One
        host read per epoch."""
        loader = stage_loader(ctx.val_loader, shuffle=False, seed=stage_seed(ctx.epoch))
        batch = ctx.to_device(next(iter(loader)))
        half = max(1, int(batch["target"].shape[0]) // 2)
        batch = {k: v[:half] for k, v in batch.items()}
        buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
        try:
            with isolated_rng(ctx.device):
                output = ctx.model(batch)
                unimodal = self.heads(output.features, target_size(batch))
                supervised = ctx.task.loss(output.prediction, batch["target"])
                aligned = pairwise_alignment([unimodal[m] for m in self.modalities])
                params = [p for p in ctx.model.parameters() if p.requires_grad]
                params += list(self.heads.parameters())
                value = float(hypergradient(supervised, aligned, self._alpha_cls, self._alpha_align, params))
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return value

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task`` (2 α_cls L_task of the fused prediction), ``lfm/alignment`` (2 α_align Σ JS, through
        heads and encoders) and ``unimodal/<m>`` (each head's task loss on detached features)."""
        target = batch["target"]
        size = target_size(batch)
        unimodal = self.heads(output.features, size)
        aligned = pairwise_alignment([unimodal[m] for m in self.modalities])
        detached = self.heads({m: f.detach() for m, f in output.features.items()}, size)
        terms = {
            "task": 2.0 * self._alpha_cls * task.loss(output.prediction, target),
            "lfm/alignment": 2.0 * self._alpha_align * aligned,
        }
        terms.update(self.heads.loss_terms(detached, target, task))
        self.epoch_means.update(js=aligned.detach())
        return terms

    def host_state(self) -> dict[str, Any]:
        return {"alpha_cls": self._alpha_cls, "alpha_align": self._alpha_align, "lr_alpha": self._lr_alpha}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._alpha_cls = float(state["alpha_cls"])
        self._alpha_align = float(state["alpha_align"])
        self._lr_alpha = float(state["lr_alpha"])

    def diagnostics(self) -> dict[str, float]:
        """The epoch's weights (``alpha_cls``, ``alpha_align``) and the mean pairwise alignment ``js``."""
        return {"alpha_cls": self._alpha_cls, "alpha_align": self._alpha_align, **self.epoch_means.pop()}
