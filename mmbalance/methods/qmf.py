"""``qmf``: Quality-aware Multimodal Fusion (Zhang, Wu, Zhang, Hu, Fu, Zhou, Peng, "Provable Dynamic
Fusion for Low-Quality Multimodal Data", ICML 2023).

Late fusion with per-sample, energy-based weights: each modality's head gives logits ``f_m``; its
confidence is ``w_m = logsumexp(f_m) / 10`` (minus a tenth of the free energy); the prediction is
``Σ_m w_m f_m`` (weights detached). Loss: cross-entropy of the fused and of every unimodal prediction,
plus ``λ Σ_m`` a margin-ranking loss that orders the confidences of neighbouring samples by their
training loss (low loss ⇒ high confidence).

Port of ``QingyangZhang/QMF:text-image-classification/src/models/late_fusion.py`` and
``train_qmf.py`` (``model_forward``, ``rank_loss``, ``History``), and
``RGBD-scene-recognition/models/QMF.py`` / ``train_QMF_nyud2.py`` (λ = ``--lamb``). Deviation
(``methods/qmf.md``): the official ranking targets are each sample's loss summed over all past
epochs, keyed by its dataset index; mmbalance batches carry no index (and augmented Food-101 /
BraTS items differ per epoch), so by default the targets are the current step's per-sample losses;
``history="cumulative"`` restores the official history for data whose batches carry ``"index"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError, DataError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.methods._lazy_buffers import follow_saved_shapes_
from mmbalance.methods._precision import upcast
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["QMF", "QMFConfig", "energy_confidence", "quality_fusion", "normalize_history", "ranking_loss"]

INDEX_KEY = "index"


@dataclass(frozen=True)
class QMFConfig(HeadConfig):
    lam: float = 0.1  # λ, weight of the confidence-ranking loss (train_QMF_nyud2.py / _sun.py --lamb)
    conf_scale: float = 0.1  # w_m = conf_scale · logsumexp(f_m), i.e. −Energy / 10 (QMF.py, late_fusion.py)
    detach_weights: bool = True  # fused = Σ w_m.detach() f_m (late_fusion.py, --df); False: RGB-D QMF.py
    # ranking targets: "step" (current per-sample loss) or "cumulative" (official; needs batch["index"])
    history: Literal["step", "cumulative"] = "step"
    head_hidden: int | None = None  # None: linear heads (official clf with --hidden [])
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's LR)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, finite(self.lam) and self.lam >= 0, "lam", "a finite number >= 0")
        need(self, finite(self.conf_scale) and self.conf_scale > 0, "conf_scale", "a finite number > 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_qmf.py) ----------------
def energy_confidence(logits: Tensor, scale: float = 0.1) -> Tensor:
    """``scale · logsumexp(logits)`` over the class dim 1: ``(B, K) -> (B, 1)``, ``(B, K, H, W) ->
    (B, 1, H, W)`` (per pixel), in the logits' dtype (at least float32). The official
    ``log(sum(exp(f)))/10``, computed stably."""
    return scale * torch.logsumexp(upcast(logits), dim=1, keepdim=True)


def quality_fusion(
    logits: Mapping[str, Tensor], weights: Mapping[str, Tensor], detach: bool = True
) -> Tensor:
    """``Σ_m w_m f_m`` (weights broadcast over the class dim); ``detach`` stops the fused loss's
    gradient through the weights.

    Raises:
        ShapeError: no modalities, or logits of different shapes.
    """
    if not logits:
        raise ShapeError("quality_fusion needs at least one modality's logits, got none")
    shapes = {tuple(v.shape) for v in logits.values()}
    if len(shapes) != 1:
        raise ShapeError(f"unimodal logits differ in shape: {sorted(shapes)}")
    fused: Tensor | None = None
    for m, f in logits.items():
        w = weights[m].detach() if detach else weights[m]
        term = f * w.to(f.dtype)
        fused = term if fused is None else fused + term
    assert fused is not None
    return fused


def normalize_history(values: Tensor, reference: Tensor) -> Tensor:
    """Min-max normalisation of ``values`` by the min and max of ``reference``
    (``History.correctness_normalize``); 0 where ``reference`` is constant (the official 0/0)."""
    low, high = reference.min(), reference.max()
    span = high - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (values - low) / safe_span, torch.zeros_like(values))


def ranking_loss(confidence: Tensor, correctness: Tensor) -> Tensor:
    """The official ``rank_loss``: sample i is paired with sample i + 1 (``torch.roll(·, -1)``);
    ``t = sign(c_i − c_{i+1})``, ``margin = |c_i − c_{i+1}|`` of the normalised loss histories ``c``;
    ``MarginRankingLoss(0)(w_i, w_{i+1} + margin / t', −t)`` with ``t' = t`` or 1 where ``t = 0``,
    i.e. ``mean_i max(0, t (w_i − w_{i+1} − margin / t'))``. ``confidence``, ``correctness``: ``(B,)``."""
    if confidence.shape != correctness.shape or confidence.dim() != 1:
        raise ShapeError(
            "confidence and correctness must both be (B,), got "
            f"{tuple(confidence.shape)} and {tuple(correctness.shape)}"
        )
    c2 = correctness.roll(-1)
    target = torch.sign(correctness - c2).to(confidence.dtype)
    margin = (correctness - c2).abs().to(confidence.dtype)
    nonzero = torch.where(target == 0, torch.ones_like(target), target)
    second = confidence.roll(-1) + margin / nonzero
    return F.margin_ranking_loss(confidence, second, -target, margin=0.0)


@register_method("qmf")
class QMF(HeadedBalancer):
    """Energy-weighted late fusion of unimodal heads with a confidence-ranking regulariser."""

    Config = QMFConfig
    presets = {
        # text-image-classification/train_qmf.py: rank loss added with weight 1, detached weights
        "food101": {"lam": 1.0},
        "mvsa_single": {"lam": 1.0},
        # RGBD-scene-recognition/train_QMF_*.py: --lamb 0.1, confidences not detached in QMF.py
        "nyud2": {"lam": 0.1, "detach_weights": False},
        "sunrgbd": {"lam": 0.1, "detach_weights": False},
    }
    tasks = frozenset({"cls", "seg"})
    paper = "Zhang et al., ICML 2023 (QingyangZhang/QMF)"
    heads_detach = False  # the heads are the predictor: their losses train the encoders

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        # cumulative per-sample loss per modality (official History.correctness), sized at epoch 0
        self.register_buffer("loss_history", torch.zeros(len(self.modalities), 0, dtype=torch.float64))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        follow_saved_shapes_(self, state_dict, prefix, ("loss_history",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """``history="cumulative"``: size the per-sample history to the training split (once)."""
        if self.config.history == "cumulative" and self.loss_history.shape[1] == 0:
            n = len(ctx.train_loader.dataset)
            self.loss_history = torch.zeros(len(self.modalities), n, dtype=torch.float64, device=ctx.device)

    # -- forward and loss -----------------------------------------------------------------------
    def _fuse(
        self, features: Mapping[str, Tensor], out_size: tuple[int, int] | None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``(fused prediction, {m: logits}, {m: confidence w_m})``."""
        logits = self.heads(features, out_size)
        weights = {m: energy_confidence(logits[m], self.config.conf_scale) for m in self.modalities}
        return quality_fusion(logits, weights, self.config.detach_weights), logits, weights

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders and the quality-weighted late fusion of the unimodal heads (the model's own
        fusion module and head are not part of QMF)."""
        features, extras = model.encode(batch)
        fused, logits, weights = self._fuse(features, target_size(batch))
        extras["qmf.logits"], extras["qmf.weights"] = logits, weights
        return ModelOutput(fused, features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``task``: loss of the fused prediction; ``unimodal/<m>``: loss of head m;
        ``rank/<m>``: λ · ranking loss of modality m's confidence against its loss history."""
        target = batch["target"]
        logits, weights = output.extras["qmf.logits"], output.extras["qmf.weights"]
        index = self._sample_index(batch) if self.config.history == "cumulative" else None
        terms = {"task": task.loss(output.prediction, target)}
        confidences = []
        for i, m in enumerate(self.modalities):
            terms[head_term(m)] = task.loss(logits[m], target)
            per_sample = task.loss(upcast(logits[m].detach()), target, reduction="none").double()
            confidence = weights[m].reshape(weights[m].shape[0], -1).mean(dim=1)  # per pixel -> per sample
            if index is None:
                correctness = normalize_history(per_sample, per_sample)
            else:  # official order (train_qmf.py): update the history, then rank
                self.loss_history[i].index_add_(0, index, per_sample)
                correctness = normalize_history(self.loss_history[i, index], self.loss_history[i])
            terms[f"rank/{m}"] = self.config.lam * ranking_loss(confidence, correctness)
            confidences.append(confidence.detach().mean())
        self.epoch_means.update(confidence=torch.stack(confidences))
        return terms

    def _sample_index(self, batch: Mapping[str, Tensor]) -> Tensor:
        n = self.loss_history.shape[1]
        if INDEX_KEY not in batch:
            raise DataError(
                f"qmf history='cumulative' needs each training batch to carry {INDEX_KEY!r} "
                "(dataset indices, int64 (B,)); "
                f"batch keys are {sorted(batch)}. Add the key to the dataset or use history='step'"
            )
        if n == 0:
            raise ConfigError(
                "qmf history='cumulative': the history is sized in on_train_epoch_start, which has not run"
            )
        index = batch[INDEX_KEY].reshape(-1).long()
        if index.shape[0] != batch["target"].shape[0]:
            raise ShapeError(
                f"batch[{INDEX_KEY!r}] has {index.shape[0]} entries for a batch of {batch['target'].shape[0]}"
            )
        return index

    def predict(self, output: ModelOutput) -> Tensor:
        """The quality-weighted fusion of the unimodal heads on ``output.features``."""
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        return self._fuse(output.features, size)[0]

    def inference_state_dict(self) -> dict[str, Any]:
        """The unimodal heads are the test-time predictor."""
        return dict(self.heads.state_dict(prefix="heads."))

    def diagnostics(self) -> dict[str, float]:
        """Epoch mean of each modality's confidence ``w_m`` (training batches), ``confidence/<m>``."""
        return self.epoch_means.pop()
