"""``aug``: sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang, "Rethinking
Multimodal Learning from the Perspective of Mitigating Classification Ability Disproportion",
NeurIPS 2025).

Every modality has a stack of classifiers on its encoder feature (a hidden layer each, one output
layer shared by all); its prediction is the sum of its classifiers' logits, and the multimodal
prediction a weighted sum of the modalities' ensembles. With ``n >= 2`` classifiers, modality m's
loss is ``ℓ(F_n, y) + ℓ(F_{n-1}, y) + mean_i (1 − η p_i) ℓ_i(f_n, y)``: the ensemble, the ensemble
before the newest classifier f_n, and f_n on the residual error (``p_i`` = the probability of the
target under ``F_{n-1}``, detached); with one classifier ``ℓ(F_1, y)``. After every ``assign_every``
epochs the epoch's confidence scores ``s_m = Σ_i softmax(F_m)_i[y_i]`` name the weak modality
(``s_1 / s_2`` outside ``λ ± margin``), which receives a new classifier.

Port of ``njustkmg/NeurIPS25-AUG:train_CREMAD.py`` (``train_audio_video``, ``val``, the main loop)
and ``model/AudioVideo.py`` (``AVGBShareClassifier``). Deviations (``methods/aug.md``): added
classifiers are trained (the released optimizer is built before they exist, so they keep their
initial weights: ``train_added=False``); one optimizer step on the summed modality losses instead
of one per modality; three or more modalities use pairwise-average ratios; segmentation uses
per-pixel logits with ``p_i = exp(−ℓ_i)``. Regression has no class probabilities: cls and seg only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._boosting import BoostedClassifiers, BoostedOutputs
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._heads import head_term
from mmbalance.methods._stages import target_size
from mmbalance.methods.ogm_ge import pairwise_ratios
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = [
    "AUG",
    "AUGConfig",
    "assignment_interval",
    "assigns_after",
    "weak_modality",
    "target_confidence",
    "residual_loss",
]


@dataclass(frozen=True)
class AUGConfig(HeadConfig):
    lam: float = 1.0  # λ (--lam): target of the epoch score ratio s_1 / s_2 (classifier assignment)
    margin: float = 0.01  # dead zone around λ: `ratio_a > lam + 0.01` / `ratio_a < lam - 0.01`
    eta: float = 0.5  # η: residual weight, CE(f_n, y) − η CE(f_n, y ⊙ p) (code 0.5; its comment 0.2)
    assign_every: int | None = None  # epochs between assignments; None: epochs // 10, or 1 up to 10 epochs
    merge_weights: Mapping[str, float] = field(default_factory=dict)  # test-time weight per modality; {}: 1/M
    classifier_hidden: int = 256  # hidden width of every classifier (embedding_a: Linear(512, 256))
    train_added: bool = True  # train added classifiers (paper); False: the released code, kept at init
    head_lr: float | None = None  # LR of the classifiers' optimizer (None: the run's; official one SGD)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features

    def check(self) -> None:
        need(self, finite(self.lam) and self.lam > 0, "lam", "a finite number > 0")
        need(self, finite(self.margin) and self.margin >= 0, "margin", "a finite number >= 0")
        need(self, finite(self.eta) and 0 <= self.eta <= 1, "eta", "in [0, 1]")
        every = self.assign_every
        need(self, every is None or every >= 1, "assign_every", "None or an integer >= 1")
        need(self, self.classifier_hidden >= 1, "classifier_hidden", "an integer >= 1")
        weights = list(self.merge_weights.values())
        valid = all(finite(w) and w >= 0 for w in weights) and (not weights or sum(weights) > 0)
        need(self, valid, "merge_weights", "finite weights >= 0, not all 0")


# -- the arithmetic (hand-checked in tests/methods/test_aug.py) ------------------------------------
def assignment_interval(num_epochs: int, assign_every: int | None) -> int:
    """Epochs between assignments: ``assign_every``, or the official ``int(epochs / 10)`` for runs
    longer than 10 epochs and 1 otherwise."""
    if assign_every is not None:
        return assign_every
    return num_epochs // 10 if num_epochs > 10 else 1


def assigns_after(epoch: int, interval: int) -> bool:
    """Whether the scores of epoch ``epoch`` (0-based) decide an assignment:
    ``(epoch + 1) % interval == 0 or epoch == 0``."""
    return (epoch + 1) % interval == 0 or epoch == 0


def weak_modality(scores: Sequence[float], lam: float, margin: float) -> int | None:
    """Index of the modality that receives a classifier, or ``None``.

    Two modalities (official): ``r = s_1 / s_2``; the second if ``r > λ + margin``, the first if
    ``r < λ − margin``. More: the one with the lowest pairwise-average ratio
    ``ρ_m = mean_{v≠m} s_m / s_v``, if ``ρ_m < λ − margin``.
    """
    if len(scores) == 2:
        ratio = scores[0] / scores[1] if scores[1] > 0 else float("inf")
        if ratio > lam + margin:
            return 1
        return 0 if ratio < lam - margin else None
    ratios = pairwise_ratios(torch.tensor(scores, dtype=torch.float64)).tolist()
    weakest = min(range(len(ratios)), key=ratios.__getitem__)
    return weakest if ratios[weakest] < lam - margin else None


def target_confidence(prediction: Tensor, target: Tensor, task: Any) -> Tensor:
    """Per-sample probability of the target, ``(B,)``: ``softmax(out)_i[y_i]`` for cls, and
    ``exp(−ℓ_i)`` with the per-sample task loss for seg (pixels averaged inside ℓ)."""
    if task.name == "cls":
        return F.softmax(prediction.float(), dim=1).gather(1, target.long().reshape(-1, 1)).reshape(-1)
    return torch.exp(-task.loss(prediction.float(), target, reduction="none"))


def residual_loss(losses: Tensor, confidence: Tensor, eta: float) -> Tensor:
    """``mean_i (1 − η c_i) ℓ_i``: the official ``CE(f_n, y) − η CE(f_n, y ⊙ p)``, since the soft
    cross-entropy against ``y ⊙ p`` is ``p_{y_i} · CE_i`` for one-hot ``y``."""
    return ((1 - eta * confidence.detach()) * losses).mean()


@register_method("aug")
class AUG(Balancer):
    """AUG: per-modality boosted classifier stacks; the weak modality keeps receiving classifiers."""

    Config = AUGConfig
    presets = {
        "cremad": {"merge_weights": {"audio": 0.4, "visual": 0.6}},  # train_CREMAD.py --merge_alpha 0.4
        # 256 is sized for 512-d ResNet features; on the 64-d / 16-channel synthetic features it makes
        # the classifiers larger than the whole model (1x1 convs on every pixel for seg4)
        "synthetic": {"classifier_hidden": 128},
    }
    tasks = frozenset({"cls", "seg"})
    paper = "Jiang et al., NeurIPS 2025 (njustkmg/NeurIPS25-AUG)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: AUGConfig = self.config
        if cfg.merge_weights and set(cfg.merge_weights) != set(self.modalities):
            raise ConfigError(
                f"merge_weights must name every modality {self.modalities}, got {sorted(cfg.merge_weights)}"
            )
        raw = [float(cfg.merge_weights.get(m, 1.0)) for m in self.modalities]
        self._merge = [w / sum(raw) for w in raw]
        self.classifiers = BoostedClassifiers(
            self.modalities, task.name, int(task.num_outputs), hidden=cfg.classifier_hidden,
            sequence_pool=cfg.sequence_pool, optimizer_factory=optimizer_factory, lr=cfg.head_lr,
            train_added=cfg.train_added,
        )
        # Σ_i p(y_i) of each modality's ensemble over the current epoch (reset at every epoch start).
        self.register_buffer("score_sums", torch.zeros(len(self.modalities), dtype=torch.float64))

    def _merged(self, outputs: Mapping[str, BoostedOutputs]) -> Tensor:
        """``Σ_m w_m F_m`` (official: ``merge_alpha · out_a + (1 − merge_alpha) · out_v``)."""
        total = None
        for w, m in zip(self._merge, self.modalities, strict=True):
            term = w * outputs[m].total
            total = term if total is None else total + term
        assert total is not None
        return total

    # -- training step ----------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders and the classifier stacks (the model's fusion module and head are not part of AUG)."""
        features, extras = model.encode(batch)
        outputs = self.classifiers(features, target_size(batch))
        extras["aug.outputs"] = outputs
        return ModelOutput(self._merged(outputs), features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``unimodal/<m>``: modality m's boosting loss; accumulates the epoch scores on the device."""
        target = batch["target"]
        outputs: Mapping[str, BoostedOutputs] = output.extras["aug.outputs"]
        terms, scores = {}, []
        for m in self.modalities:
            o = outputs[m]
            loss = task.loss(o.total, target)
            if o.newest is not None and o.previous is not None:
                confidence = target_confidence(o.previous.detach(), target, task)
                newest = task.loss(o.newest, target, reduction="none")
                residual = residual_loss(newest, confidence, self.config.eta)
                loss = loss + task.loss(o.previous, target) + residual
            terms[head_term(m)] = loss
            with torch.no_grad():
                scores.append(target_confidence(o.total.detach(), target, task).sum())
        with torch.no_grad():
            self.score_sums += torch.stack(scores).to(self.score_sums.dtype)
        return terms

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the classifier stacks' own optimizer (the encoders are stepped by the main one)."""
        self.classifiers.step(ctx.scaler)

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Adaptive classifier assignment from the previous epoch's scores (one host read), then a
        new epoch of scores. Runs before the epoch's first step, so a best-validation snapshot never
        holds a classifier that its validation did not see."""
        previous = ctx.epoch - 1
        interval = assignment_interval(ctx.num_epochs, self.config.assign_every)
        if previous >= 0 and assigns_after(previous, interval) and self.classifiers.built:
            scores = self.score_sums.tolist()
            if any(s > 0 for s in scores):  # no step since the last reset (a fresh, resumed run): none
                weak = weak_modality(scores, self.config.lam, self.config.margin)
                if weak is not None:
                    self.classifiers.add(self.modalities[weak])
        self.score_sums.zero_()

    # -- test time ------------------------------------------------------------------------------
    def predict(self, output: ModelOutput) -> Tensor:
        """``Σ_m w_m F_m`` on ``output.features`` (the fusion prediction is ignored)."""
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        return self._merged(self.classifiers(output.features, size))

    def inference_state_dict(self) -> dict[str, Any]:
        """The classifier stacks are the test-time predictor."""
        return dict(self.classifiers.state_dict(prefix="classifiers."))

    def diagnostics(self) -> dict[str, float]:
        """Classifiers per modality (``classifiers/<m>``) and the epoch's pairwise score ratios
        (``score_ratio/<m>``; for two modalities the first is the official ``ratio_a``)."""
        out = {f"classifiers/{m}": float(n) for m, n in self.classifiers.counts().items()}
        scores = self.score_sums.cpu()
        if bool((scores > 0).all()):
            ratios = pairwise_ratios(scores).tolist()
            out.update({f"score_ratio/{m}": r for m, r in zip(self.modalities, ratios, strict=True)})
        return out
