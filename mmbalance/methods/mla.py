"""``mla``: Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024).

No joint loss. For every batch the modalities are trained in turn, each through its own encoder and
one **shared** linear head with its unimodal loss; the head is stepped after each modality, and its
weight gradient is first projected (OWM-style) so that the update interferes little with what it
learnt from the previous modalities: ``r`` = batch-mean head input, ``k = P rᵀ``,
``P ← P − k kᵀ / (α + r k)``, ``P ← P / ‖P‖_F``, ``∇W ← ∇W Pᵀ``, ``α = 0.1^(1 + batch/len)``.
Test time: the unimodal predictions are fused with entropy weights ``w_m ∝ exp(max_j H_j − H_m)``.

Port of ``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation:main.py``
(``train_epoch``/``valid`` with ``--gs_flag``, ``calculate_gating_weights``) and ``utils/utils.py``
(``GSPlugin.before_update``); the fusion rule is in ``_entropy_fusion.py``. Deviations
(``methods/mla.md``): the released code never projects (its name test ``n == "module.weight"``
never matches an ``nn.Linear``; ``projection=False`` reproduces that); per-sample entropy weights by
default (the code's softmax runs over the batch dimension: ``fusion="dynamic_batch"``); each encoder
is stepped once per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._entropy_fusion import batch_entropy_weights, entropy_weights, fuse_logits
from mmbalance.methods._heads import UnimodalHeads, head_term
from mmbalance.methods._lazy_buffers import follow_saved_shapes_
from mmbalance.methods._precision import upcast
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import feature_kind, pool_features
from mmbalance.tasks import Task

__all__ = ["MLA", "MLAConfig", "project_gradient_", "entropy_weights", "batch_entropy_weights", "fuse_logits"]

SHARED = "shared"


@dataclass(frozen=True)
class MLAConfig(HeadConfig):
    # test-time fusion: dynamic (per-sample entropy), dynamic_batch (official, over the batch), fixed
    fusion: Literal["dynamic", "dynamic_batch", "fixed"] = "dynamic"
    fusion_weights: Mapping[str, float] = field(default_factory=dict)  # fixed: w_m per modality; {} = 1/M
    # project the shared head's gradient (paper); False = the released code (never fires)
    projection: bool = True
    head_lr: float | None = None  # LR of the shared head (None = the run's LR)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features (official: a.mean(dim=1))

    def check(self) -> None:
        for m, w in self.fusion_weights.items():
            if not (finite(w) and w >= 0):
                raise ValueError(f"fusion_weights[{m!r}] must be a finite number >= 0, got {w!r}")
        if self.fusion_weights and sum(self.fusion_weights.values()) <= 0:
            raise ValueError(f"fusion_weights must not all be 0, got {dict(self.fusion_weights)!r}")


@torch.no_grad()
def project_gradient_(
    projector: Tensor, weight_grad: Tensor, head_input_mean: Tensor, alpha: float
) -> Tensor:
    """One ``GSPlugin.before_update``: ``k = P rᵀ``; ``P ← P − k kᵀ / (α + r k)``; ``P ← P / ‖P‖_F``;
    then ``∇W ← ∇W Pᵀ`` in place. ``projector``: ``(d, d)``, updated in place and returned;
    ``weight_grad``: ``(K, d)`` or a 1×1 conv's ``(K, d, 1, 1)``; ``head_input_mean``: ``(d,)``.
    Hand-checked in ``tests/methods/test_mla.py``."""
    d = projector.shape[0]
    r = head_input_mean.reshape(1, d).to(projector.dtype)
    k = projector @ r.T
    projector.sub_(k @ k.T / (alpha + r @ k))
    projector.div_(torch.linalg.matrix_norm(projector))
    flat = weight_grad.reshape(weight_grad.shape[0], d)
    flat.copy_(flat @ projector.T.to(flat.dtype))
    return projector


@register_method("mla")
class MLA(Balancer):
    """Alternating unimodal updates through a shared, gradient-projected head; entropy-weighted fusion."""

    Config = MLAConfig
    presets = {
        # main.py: main(av_alpha=0.55) -> fixed fusion 0.55 * out_a + 0.45 * out_v;
        # modal3: a/v/t 0.35/0.25/0.4
        "cremad": {"fusion_weights": {"audio": 0.55, "visual": 0.45}},
        "food101": {"fusion_weights": {"text": 0.55, "image": 0.45}},  # M3AEClassifier: a = text, v = image
        "iemocap": {"fusion_weights": {"audio": 0.35, "vision": 0.25, "text": 0.4}},
    }
    tasks = frozenset({"cls", "seg"})
    paper = "Zhang et al., CVPR 2024 (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation)"
    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: MLAConfig = self.config
        if cfg.fusion == "fixed" and cfg.fusion_weights:
            if set(cfg.fusion_weights) != set(self.modalities):
                raise ConfigError(
                    f"mla fusion_weights must name exactly the modalities {list(self.modalities)}, "
                    f"got {sorted(cfg.fusion_weights)}"
                )
        # One linear head shared by all modalities, with its own optimizer (stepped once per modality).
        self.head = UnimodalHeads(
            (SHARED,), task.name, int(task.num_outputs), hidden=None, sequence_pool=cfg.sequence_pool,
            detach=False, optimizer_factory=optimizer_factory, lr=cfg.head_lr,
        )
        # P: the identity of the head's input width at first use
        self.register_buffer("projector", torch.zeros(0, 0))
        self.register_buffer("head_updates", torch.zeros((), dtype=torch.long))  # official exp_count
        self._updates = 0  # host mirror of head_updates (read every modality update without a device sync)
        self._batch_index, self._batches_per_epoch = 0, 1
        self._pending: dict[str, Any] | None = None

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        follow_saved_shapes_(self, state_dict, prefix, ("projector",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._updates = int(self.head_updates)

    # -- the shared head ----------------------------------------------------------------------------
    def _check_features(self, features: Mapping[str, Tensor]) -> None:
        layout = {}
        for m in self.modalities:
            f = features[m]
            kind = feature_kind(f, m)
            layout[m] = (kind, int(f.shape[1] if kind == "map" else f.shape[-1]))
        if len(set(layout.values())) != 1:
            raise ShapeError(
                "mla shares one head across modalities, so every features[m] needs the same kind and width; "
                f"got {layout}"
            )

    def _logits(self, feature: Tensor, out_size: tuple[int, int] | None) -> Tensor:
        return self.head({SHARED: feature}, out_size)[SHARED]

    def _head_input_mean(self, feature: Tensor) -> Tensor:
        """Batch mean of the shared linear layer's input: the pooled vector, or the map averaged over
        pixels."""
        if self.task is not None and self.task.name == "seg":
            return upcast(feature.detach()).mean(dim=(0, 2, 3))
        return upcast(pool_features(feature.detach(), self.config.sequence_pool)).mean(dim=0)

    def _fusion_weights(self, logits: Mapping[str, Tensor]) -> Mapping[str, Tensor | float]:
        cfg: MLAConfig = self.config
        if cfg.fusion == "dynamic":
            return entropy_weights(logits)
        if cfg.fusion == "dynamic_batch":
            return batch_entropy_weights(logits)
        if cfg.fusion_weights:
            total = sum(cfg.fusion_weights.values())
            return {m: cfg.fusion_weights[m] / total for m in self.modalities}
        return {m: 1.0 / len(self.modalities) for m in self.modalities}

    # -- training step --------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._batch_index, self._batches_per_epoch = 0, max(1, len(ctx.train_loader))

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders, then the shared head on each modality (the model's fusion is not part of MLA).
        The output's prediction is the test-time fusion of these logits (no gradient)."""
        features, extras = model.encode(batch)
        self._check_features(features)
        size = target_size(batch)
        logits = {m: self._logits(features[m], size) for m in self.modalities}
        extras["mla.logits"] = logits
        with torch.no_grad():
            prediction = fuse_logits({m: f.detach() for m, f in logits.items()}, self._fusion_weights(logits))
        return ModelOutput(prediction, features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``unimodal/<m>``: the shared head's loss on modality m (with the head as it is before this
        batch's updates; :meth:`backward` recomputes modality m's loss after the head has been
        stepped for the modalities before it, as the official loop does)."""
        device_type = batch["target"].device.type
        autocast = None
        if torch.is_autocast_enabled(device_type):
            autocast = (device_type, torch.get_autocast_dtype(device_type))
        self._pending = {"features": output.features, "target": batch["target"], "size": target_size(batch),
                         "task": task, "autocast": autocast}
        logits = output.extras["mla.logits"]
        return {head_term(m): task.loss(logits[m], batch["target"]) for m in self.modalities}

    def backward(self, terms: Mapping[str, Tensor], scaler: torch.amp.GradScaler) -> None:
        """For each modality in order: backward of its loss (encoder m and the shared head), project
        the head's weight gradient, step and zero the head. The encoders' gradients accumulate and
        the runner's optimizer steps them once.

        Raises:
            UnsupportedError: an enabled (fp16) GradScaler: it allows one step per optimizer and
                iteration, MLA steps the head M times (use amp="bf16" or "none").
        """
        if scaler.is_enabled():
            raise UnsupportedError(
                "mla steps its shared head once per modality in every batch (M steps); a GradScaler allows "
                "one step "
                "per optimizer per iteration, so amp='fp16' is unsupported: use amp='bf16' or 'none'"
            )
        pending, optimizer = self._pending, self.head.optimizer
        if pending is None or optimizer is None:
            raise ConfigError("mla: backward ran before loss_terms prepared the batch")
        self._pending = None
        weight = self._head_weight()
        alpha = 0.1 ** (self._batch_index / self._batches_per_epoch + 1)
        for i, m in enumerate(self.modalities):
            if i == 0:
                loss = terms[head_term(m)]
            else:
                with self._autocast(pending["autocast"]):
                    logits = self._logits(pending["features"][m], pending["size"])
                    loss = pending["task"].loss(logits, pending["target"])
            loss.backward()
            if self.config.projection and self._updates > 0 and weight.grad is not None:
                if self.projector.numel() == 0:
                    self.projector = torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype)
                head_input = self._head_input_mean(pending["features"][m])
                project_gradient_(self.projector, weight.grad, head_input, alpha)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.head_updates += 1
            self._updates += 1

    @staticmethod
    def _autocast(spec: tuple[str, torch.dtype] | None) -> contextlib.AbstractContextManager:
        if spec is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=spec[0], dtype=spec[1])

    def _head_weight(self) -> nn.Parameter:
        layer = self.head.heads[SHARED].net
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            raise ConfigError(
                f"mla's shared head must be one linear (1x1 conv) layer, got {type(layer).__name__}"
            )
        return layer.weight

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Advance the batch position used by the projection's α (``batch_idx / len(dataloader)``)."""
        self._batch_index = (ctx.step_in_epoch + 1) % max(1, ctx.steps_per_epoch)
        self._batches_per_epoch = max(1, ctx.steps_per_epoch)

    def host_state(self) -> dict[str, Any]:
        """The batch position of the projection's α (a resumed run continues mid-epoch)."""
        return {"batch_index": self._batch_index, "batches_per_epoch": self._batches_per_epoch}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._batch_index = int(state["batch_index"])
        self._batches_per_epoch = int(state["batches_per_epoch"])

    # -- inference ----------------------------------------------------------------------------------
    def predict(self, output: ModelOutput) -> Tensor:
        """The shared head on every modality's features, fused by ``fusion``."""
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        logits = {m: self._logits(output.features[m], size) for m in self.modalities}
        weights = self._fusion_weights(logits)
        self._record(weights)
        return fuse_logits(logits, weights)

    def inference_state_dict(self) -> dict[str, Any]:
        """The shared head is the test-time predictor."""
        return dict(self.head.state_dict(prefix="head."))

    # -- diagnostics --------------------------------------------------------------------------------
    def _record(self, weights: Mapping[str, Tensor | float]) -> None:
        means = [torch.as_tensor(weights[m], dtype=torch.float64).mean() for m in self.modalities]
        self.epoch_means.update(fusion_weight=torch.stack(means))

    def diagnostics(self) -> dict[str, float]:
        """Mean fusion weight per modality over the batches predicted since the last call
        (``fusion_weight/<m>``), and the number of shared-head updates so far."""
        return {"head_updates": float(self.head_updates), **self.epoch_means.pop()}
