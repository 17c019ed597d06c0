"""``cggm``: Classifier-Guided Gradient Modulation (Guo, Jin, Chen, Zhao; NeurIPS 2024; arXiv 2411.01409).

Official code: ``zrguo/CGGM`` (``src/msatrain.py``, ``src/foodtrain.py``, ``src/segtrain.py``,
``models/msamodel.py``, ``models/segmodel.py``, ``src/eval_metrics.py``). Card: ``methods/cggm.md``.

Mechanism. A classifier head f_i (:mod:`mmbalance.methods._cggm_heads`) reads each modality's
*detached* encoder output and is trained with the task loss by its own optimizer. Each step its
batch metric ε_i (accuracy / sign accuracy / mean Dice) gives Δε_i = ε_i^t − ε_i^{t−1} and the
magnitude term B_i = ρ (Σ_k Δε_k − Δε_i) / (Σ_k Δε_k + 1e-8) (Eq. 7), which scales modality i's
encoder gradient (Eq. 8). The direction term L_gm = (1/M) Σ_i (|c_i| − c_i cos_i) (Eq. 12) enters the
loss with weight λ (Eq. 13).

Cost. No second pass through encoders or fusion: the heads run on detached features and their loss
is one more term of the single backward. ε, B and L_gm stay on the device (no host sync per step);
each modality's gradients are scaled by one ``torch._foreach_mul_``.

Deviations from the official code (details and which option reproduces what: ``methods/cggm.md``):
``direction="official"`` reproduces the code (cosine of the output-layer *weights*, one step stale,
ρ outside L_gm); ``direction="paper"`` uses the current step's last-layer *gradients* in closed form;
``stabilize=True`` bounds B (the code's B explodes when Σ Δε ≈ 0); heads are one forward of the
classifier with ``proj1`` applied once (the code applies it twice); the heads' loss shares the main
backward (the code runs a second ``backward()`` on the heads only, with the same result).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import Balancer, OptimizerFactory, StepContext
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.methods import register_method
from mmbalance.methods._cggm_heads import MapHead, build_head
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import ClassificationTask, RegressionTask, SegmentationTask, Task

__all__ = [
    "CGGM",
    "CGGMConfig",
    "DIRECTIONS",
    "magnitude_coefficients",
    "direction_loss",
    "output_gradient",
    "last_layer_gradient",
    "interpolation_matrix",
]

DIRECTIONS = ("official", "paper")
EPS_METRICS = ("score", "neg_mae")
SUM_EPS = 1e-8  # the official `diff_sum = sum(diff) + 1e-8`


@dataclass(frozen=True)
class CGGMConfig:
    """CGGM hyperparameters. Defaults: the official MOSI/IEMOCAP run scripts (``run/mosi_run.py``)."""

    rho: float = 1.3  # ρ, Eq. 7 scale of the magnitude term B (official `rou`)
    lam: float = 0.2  # λ, Eq. 13 weight of the direction loss L_gm (official `lamda`)
    cls_lr: float = 5e-4  # learning rate of the heads f_i (official `cls_lr`); run's optimizer type
    cls_weight_decay: float | None = None  # heads' weight decay; None = the run's (Food-101 code: 3e-3)
    direction: str | None = "official"  # "official" (weights, one step stale) | "paper" (Eq. 12) | None
    rho_in_direction: bool | None = None  # ρ inside L_gm (c = B); None = official: False, paper: True
    magnitude: bool = True  # multiply encoder gradients by B (Eq. 8); False = direction-only ablation
    stabilize: bool = False  # guard: B = ρ(M-1)/M when Σ Δε < 1/batch, else clamp >= 0 and renormalise
    eps_metric: str = "score"  # ε source: "score" = task.score (acc / sign acc / Dice), "neg_mae" (reg)
    head_layers: int = 2  # head depth: transformer layers (official `cls_layers`), MLP / conv blocks
    head_heads: int | None = None  # attention heads of sequence heads; None = largest divisor <= 5 of d
    head_dropout: float = 0.1  # dropout inside the heads (official: 0.1-0.2 by dataset)
    grad_cos_every: int = 8  # steps between samples of the closed-form grad_cos diagnostic; 0 = off

    def __post_init__(self) -> None:
        direction = self.direction
        if isinstance(direction, str) and direction.lower() in ("none", "null", ""):
            direction = None
            object.__setattr__(self, "direction", None)
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS} or None, got {self.direction!r}")
        if self.rho_in_direction is None:
            object.__setattr__(self, "rho_in_direction", direction == "paper")
        if not (isinstance(self.rho, int | float) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {self.rho!r}")
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.cls_lr, int | float) and self.cls_lr > 0):
            raise ValueError(f"cls_lr must be > 0, got {self.cls_lr!r}")
        if self.cls_weight_decay is not None and not self.cls_weight_decay >= 0:
            raise ValueError(f"cls_weight_decay must be None or >= 0, got {self.cls_weight_decay!r}")
        for name in ("rho_in_direction", "magnitude", "stabilize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.eps_metric not in EPS_METRICS:
            raise ValueError(f"eps_metric must be one of {EPS_METRICS}, got {self.eps_metric!r}")
        if not (isinstance(self.head_layers, int) and self.head_layers >= 1):
            raise ValueError(f"head_layers must be an integer >= 1, got {self.head_layers!r}")
        if self.head_heads is not None and not (isinstance(self.head_heads, int) and self.head_heads >= 1):
            raise ValueError(f"head_heads must be None or an integer >= 1, got {self.head_heads!r}")
        if not (0 <= self.head_dropout < 1):
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if not (isinstance(self.grad_cos_every, int) and self.grad_cos_every >= 0):
            raise ValueError(f"grad_cos_every must be an integer >= 0, got {self.grad_cos_every!r}")


# -- the formulas (pure functions, hand-tested) ---------------------------------------------------
def magnitude_coefficients(delta: Tensor, *, stabilize: bool = False, resolution: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eq. 7 without ρ: ``c_i = (S − Δε_i) / S``, ``S = Σ_k Δε_k + 1e-8`` (official ``coeff``).

    Args:
        delta: ``(M,)`` metric improvements Δε.
        stabilize: the guard of ``CGGMConfig.stabilize``: where ``Σ Δε < resolution`` (no reliable
            improvement signal) every ``c_i`` is the neutral ``(M−1)/M`` (the value for equal
            improvements); otherwise negative ``c_i`` are clamped to 0 and ``c`` is rescaled to
            ``Σ c = M−1``, the official identity. So ``0 <= c_i <= M−1`` always.
        resolution: threshold of the guard (CGGM uses one sample's worth of accuracy, 1/batch).

    Returns:
        ``(c, raw)``: the coefficients used and the official raw ones (for diagnostics). Device
        tensors, no host sync.
    """
    if delta.dim() != 1 or delta.numel() < 2:
        raise ShapeError(f"delta must have shape (M,) with M >= 2, got {tuple(delta.shape)}")
    total = delta.sum() + SUM_EPS
    raw = (total - delta) / total
    if not stabilize:
        return raw, raw
    m = delta.numel()
    clamped = raw.clamp(min=0)
    rescaled = clamped * ((m - 1) / clamped.sum().clamp(min=SUM_EPS))
    neutral = torch.full_like(raw, (m - 1) / m)
    return torch.where(delta.sum() < resolution, neutral, rescaled), raw


def direction_loss(coefficients: Tensor, cosines: Tensor) -> Tensor:
    """Eq. 12: ``L_gm = (1/M) Σ_i (|c_i| − c_i cos_i)`` (>= 0 for |cos| <= 1)."""
    if coefficients.shape != cosines.shape or coefficients.dim() != 1:
        raise ShapeError(
            f"coefficients {tuple(coefficients.shape)} and cosines {tuple(cosines.shape)} must both be (M,)"
        )
    return (coefficients.abs().sum() - (coefficients * cosines).sum()) / coefficients.numel()


def interpolation_matrix(size_in: int, size_out: int, *, align_corners: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(size_out, size_in)`` matrix A of 1-D linear interpolation: ``interp(x) = A @ x``.

    Bilinear interpolation is separable, so a 2-D upsampling is ``A_H X A_Wᵀ`` per channel.
    """
    eye = torch.eye(size_in, device=device, dtype=dtype).unsqueeze(0)  # rows are unit signals
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=align_corners)[0].transpose(0, 1)


def _upcast(x: Tensor) -> Tensor:
    """Half-precision (AMP) tensors to float32; float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def output_gradient(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    """``∂ task.loss(prediction, target) / ∂ prediction`` in closed form, differentiable in graph.

    Mean reduction (the training loss). cls: ``(softmax(z) − q) / B`` with ``q`` the (label-smoothed)
    one-hot target; reg: ``sign(z − y) / B`` (L1) or ``2 (z − y) / B`` (MSE); seg: the full
    ``SegLoss`` (class-weighted CE normalised by the target pixels' weights, plus the batch soft
    Dice over the foreground classes). Same shape as ``prediction``.

    Raises:
        UnsupportedError: a task type with no closed form here.
    """
    if isinstance(task, ClassificationTask):
        batch, classes = prediction.shape
        probs = torch.softmax(_upcast(prediction), dim=1)
        q = F.one_hot(target.reshape(batch).long(), classes).to(probs.dtype)
        if task.label_smoothing:
            q = q * (1 - task.label_smoothing) + task.label_smoothing / classes
        return (probs - q) / batch
    if isinstance(task, RegressionTask):
        batch = prediction.shape[0]
        pred = _upcast(prediction)
        diff = pred.reshape(batch) - target.reshape(batch).to(pred.dtype)
        g = torch.sign(diff) if task.loss_name == "l1" else 2 * diff
        return (g / batch).reshape(prediction.shape)
    if isinstance(task, SegmentationTask):
        return _seg_output_gradient(task, _upcast(prediction), target.long())
    raise UnsupportedError(
        f"direction='paper' needs the closed-form gradient of the task loss; task {type(task).__name__!r} "
        "has none (supported: ClassificationTask, RegressionTask, SegmentationTask)"
    )


def _seg_output_gradient(task: SegmentationTask, logits: Tensor, target: Tensor) -> Tensor:
    classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, classes).movedim(-1, 1).to(probs.dtype)  # (B, C, H, W)
    grad = torch.zeros_like(probs)
    if task.ce_weight:
        if task.class_weights is None:
            w_pix = torch.ones_like(target, dtype=probs.dtype)
        else:
            w_pix = torch.tensor(task.class_weights, device=logits.device, dtype=probs.dtype)[target]
        grad = grad + task.ce_weight * w_pix.unsqueeze(1) * (probs - onehot) / w_pix.sum()
    if task.dice_weight:
        fg_p, fg_t = probs[:, 1:], onehot[:, 1:]
        inter = (fg_p * fg_t).sum()
        denom = fg_p.sum() + fg_t.sum() + task.dice_smooth
        d_prob = torch.zeros_like(probs)
        d_prob[:, 1:] = -2 * task.dice_weight * (fg_t / denom - inter / denom**2)
        grad = grad + probs * (d_prob - (probs * d_prob).sum(dim=1, keepdim=True))  # softmax Jacobian
    return grad


def last_layer_gradient(
    output_grad: Tensor, hidden: Tensor, *, align_corners: bool | None = None
) -> Tensor:
    """``∂L/∂W`` of the output layer ``z = W h + b``: ``Σ_b g_b h_bᵀ`` (the 1/B is inside ``g``).

    Args:
        output_grad: ``(B, C)`` (cls/reg; ``(B,)`` for reg is accepted) or ``(B, C, H, W)`` (seg).
        hidden: the output layer's input, ``(B, d)`` or ``(B, d, h, w)``. For maps the logits may be
            bilinearly upsampled from ``(h, w)`` to ``(H, W)`` after the 1x1 layer; the upsampling's
            transpose is applied to ``output_grad`` (``align_corners`` as the model's upsampling).

    Returns:
        ``(C, d)``, the flattened shape of the output layer's weight.
    """
    if hidden.dim() == 2:
        g = output_grad.reshape(output_grad.shape[0], -1)
        return g.transpose(0, 1) @ hidden.to(g.dtype)
    if hidden.dim() != 4 or output_grad.dim() != 4:
        raise ShapeError(
            f"map gradients need output_grad (B, C, H, W) and hidden (B, d, h, w), got "
            f"{tuple(output_grad.shape)} and {tuple(hidden.shape)}"
        )
    big, small = output_grad.shape[-2:], hidden.shape[-2:]
    g = output_grad
    if tuple(big) != tuple(small):
        if align_corners is None:
            raise ShapeError(f"logits {tuple(big)} differ from the hidden map {tuple(small)}: pass align_corners")
        a_h = interpolation_matrix(small[0], big[0], align_corners=align_corners, device=g.device, dtype=g.dtype)
        a_w = interpolation_matrix(small[1], big[1], align_corners=align_corners, device=g.device, dtype=g.dtype)
        g = torch.einsum("bcHW,Hh,Ww->bchw", g, a_h, a_w)
    return torch.einsum("bchw,bdhw->cd", g, hidden.to(g.dtype))


# -- the method -------------------------------------------------------------------------------------
@register_method("cggm")
class CGGM(Balancer):
    """Classifier-guided gradient modulation: magnitude (Eq. 7-8) and direction (Eq. 12-13).

    Hook use: ``loss_terms`` runs the heads on detached features, computes ε, B and L_gm, and adds
    the terms ``cls`` (the heads' summed task loss, official ``cls_loss``) and ``gm`` (λ·L_gm);
    ``on_after_backward`` scales each encoder's gradients by B_i (after AMP unscale, before clip);
    ``on_after_optimizer_step`` steps and zeroes the heads' optimizer through the run's scaler.
    """

    Config = CGGMConfig
    presets = {
        # run/mosi_run.py, run/iemo_run.py: Adam (the run's), cls_lr 5e-4, no weight decay
        "mosi": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0, "head_dropout": 0.15},
        "iemocap": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0, "head_dropout": 0.15},
        # run/food_run.py + src/foodtrain.py: AdamW(cls_lr 5e-4, weight_decay 3e-3)
        "food101": {"rho": 1.3, "lam": 0.05, "cls_lr": 5e-4, "cls_weight_decay": 3e-3, "head_dropout": 0.15},
        # run/brats_run.py + src/segtrain.py: SGD(cls_lr 6e-3, momentum 0.9, weight_decay 3e-4), constant
        "brats": {"rho": 1.0, "lam": 0.1, "cls_lr": 6e-3, "cls_weight_decay": 3e-4, "head_dropout": 0.1},
    }
    tasks = frozenset({"cls", "reg", "seg"})
    min_modalities = 2
    grad_edit_scope = frozenset({"encoders"})
    paper = (
        "Guo, Jin, Chen, Zhao. Classifier-guided Gradient Modulation for Enhanced Multimodal Learning. "
        "NeurIPS 2024 (arXiv 2411.01409); code zrguo/CGGM"
    )

    def __init__(self, config: CGGMConfig | None = None) -> None:
        super().__init__(config)
        self.heads = nn.ModuleDict()
        self.cls_optimizer: torch.optim.Optimizer | None = None
        self._groups: list[list[nn.Parameter]] = []
        self._stale_gm: Tensor | None = None  # official: L_gm of step t, with its graph, used at t+1
        self._B: Tensor | None = None  # this step's ρ·c, read by on_after_backward
        self._step_stats: Tensor | None = None
        self._grad_norms: Tensor | None = None
        self._diag_steps = 0
        self._grad_cos_steps = 0
        self._step = 0  # training steps seen (host counter, for the grad_cos sampling)
        self._grad_cos_value: Tensor | None = None  # this step's grad_cos sample, if any
        self._checked = False
        self._align_corners: bool | None = None
        self._closed_form = False

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        """Validate the model and task, precompute the encoder parameter groups. The heads are
        built on the first training batch (feature shapes are unknown before it)."""
        super().setup(model, task, optimizer_factory)
        cfg = self.config
        if len(model.modalities) < 2:
            raise UnsupportedError(f"cggm needs at least 2 modalities, the model has {model.modalities}")
        if task.name not in self.tasks:
            raise UnsupportedError(f"cggm supports tasks {sorted(self.tasks)}, got task {task.name!r}")
        if not callable(getattr(task, "score", None)):
            raise UnsupportedError(
                f"cggm reads ε from task.score; task {type(task).__name__!r} has no score(prediction, target)"
            )
        if cfg.eps_metric == "neg_mae" and not isinstance(task, RegressionTask):
            raise UnsupportedError(f"eps_metric='neg_mae' needs a regression task, got task {task.name!r}")
        out_layer = model.out_layer
        if not isinstance(out_layer, nn.Linear | nn.Conv2d):
            raise UnsupportedError(f"cggm needs model.out_layer to be nn.Linear or nn.Conv2d, got {type(out_layer).__name__}")
        groups: list[list[nn.Parameter]] = []
        seen: dict[int, str] = {}
        for m in model.modalities:
            params = list(model.modality_parameters(m))
            if not params:
                raise ConfigError(f"model.modality_parameters({m!r}) is empty; cggm needs each encoder's parameters")
            for p in params:
                if id(p) in seen:
                    raise ConfigError(f"a parameter is in modality_parameters of both {seen[id(p)]!r} and {m!r}")
                seen[id(p)] = m
            groups.append(params)
        self._groups = groups
        self.__dict__["_model"] = model  # a reference, not a submodule (stays out of state_dict)
        self._factory = optimizer_factory
        self._head_seed = (torch.initial_seed() + 0x5EED) % (2**63)
        self._closed_form = isinstance(task, ClassificationTask | RegressionTask | SegmentationTask)
        if cfg.direction == "paper" and not self._closed_form:
            output_gradient(task, torch.zeros(1, 1), torch.zeros(1))  # raises UnsupportedError
        m = len(model.modalities)
        self.register_buffer("eps_prev", torch.zeros(m))  # ε^{t-1}; ε^0 = 0, kept across epochs
        # per-epoch sums: ε, B, cos (M each), L_gm, small-Σ flag, negative-B flag; grad cos (sampled)
        self.register_buffer("_acc", torch.zeros(3 * m + 3), persistent=False)
        self.register_buffer("_acc_grad_cos", torch.zeros(m), persistent=False)
        self.register_buffer("_acc_grad_norm", torch.zeros(m), persistent=False)
        self.register_buffer("_b_min", torch.full((m,), math.inf), persistent=False)
        self.register_buffer("_b_max", torch.full((m,), -math.inf), persistent=False)

    def _build_heads(self, features: Mapping[str, Tensor]) -> None:
        """Heads from the first batch's features, initialised from a private RNG stream so that
        building them leaves the global RNG (and so the model's dropout masks) untouched."""
        cfg, model, task = self.config, self.__dict__["_model"], self.task
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._head_seed)
            for m in self.modalities:
                self.heads[m] = build_head(
                    features[m], model.out_layer, task.num_outputs, modality=m,
                    layers=cfg.head_layers, heads=cfg.head_heads, dropout=cfg.head_dropout,
                )
        device = features[self.modalities[0]].device
        self.heads.to(device)
        self.heads.train(self.training)
        overrides: dict[str, Any] = {}
        if cfg.cls_weight_decay is not None:
            overrides["weight_decay"] = cfg.cls_weight_decay
        # foreach: one multi-tensor update for all head parameters (torch's CPU default loops in Python)
        self.cls_optimizer = self._factory(list(self.heads.parameters()), lr=cfg.cls_lr, foreach=True, **overrides)

    def _first_step_checks(self, output: ModelOutput, scores: list[Tensor]) -> None:
        """Once: features per modality, each ε a floating 0-d score, the closed form's premise."""
        missing = [m for m in self.modalities if m not in output.features]
        if missing:
            raise ShapeError(f"ModelOutput.features lacks modalities {missing}; cggm needs every encoder output")
        for m, s in zip(self.modalities, scores, strict=True):
            if not (isinstance(s, Tensor) and s.dim() == 0 and s.is_floating_point()):
                got = f"{type(s).__name__} {tuple(s.shape)} {s.dtype}" if isinstance(s, Tensor) else type(s).__name__
                raise UnsupportedError(
                    f"task.score must return a 0-d floating tensor to give ε (higher is better); task "
                    f"{type(self.task).__name__!r} gave {got} for modality {m!r}"
                )
        model = self.__dict__["_model"]
        if self._closed_form and output.head_input is not None:
            self._align_corners = self._check_head_input(model, output)
        if self.config.direction == "paper" and output.head_input is None:
            raise UnsupportedError(
                "direction='paper' needs ModelOutput.head_input (the input of model.out_layer); the model gives None"
            )
        self._checked = True

    def _check_head_input(self, model: MultimodalModel, output: ModelOutput) -> bool | None:
        """Confirm ``prediction == [upsample](out_layer(head_input))`` (the closed form's premise);
        returns the upsampling's ``align_corners`` (None when no upsampling). One host sync, once."""
        with torch.no_grad():
            pred = output.prediction.float()
            z = model.out_layer(output.head_input).float()
            if z.dim() == 2 and z.numel() == pred.numel():
                z = z.reshape(pred.shape)  # regression (B, 1) vs (B,)
            if z.shape == pred.shape:
                if torch.allclose(z, pred, rtol=1e-3, atol=1e-4):
                    return None
            elif z.dim() == 4 and pred.dim() == 4 and z.shape[:2] == pred.shape[:2]:
                for ac in (True, False):
                    up = F.interpolate(z, size=pred.shape[-2:], mode="bilinear", align_corners=ac)
                    if torch.allclose(up, pred, rtol=1e-3, atol=1e-4):
                        return ac
        if self.config.direction == "paper":
            raise UnsupportedError(
                "direction='paper' needs prediction == model.out_layer(head_input) (optionally bilinearly "
                f"upsampled); this model's prediction {tuple(output.prediction.shape)} does not match"
            )
        warnings.warn(
            "cggm: model prediction != model.out_layer(head_input) (optionally bilinearly upsampled); "
            "the grad_cos diagnostic is left out",
            stacklevel=2,
        )
        self._closed_form = False
        return None

    # -- the step -------------------------------------------------------------------------------------
    def _eps(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.config.eps_metric == "neg_mae":
            batch = logits.shape[0]
            return -(logits.float().reshape(batch) - target.reshape(batch).float()).abs().mean()
        return self.task.score(logits, target)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        cfg = self.config
        target = batch["target"]
        model: MultimodalModel = self.__dict__["_model"]
        if not self.heads:
            self._build_heads(output.features)
        terms = {"task": task.loss(output.prediction, target)}
        logits, hidden = [], []
        cls_loss = None
        for m in self.modalities:
            head = self.heads[m]
            feature = output.features[m].detach()
            z, h = head(feature, tuple(target.shape[-2:])) if isinstance(head, MapHead) else head(feature)
            loss = task.loss(z, target)
            cls_loss = loss if cls_loss is None else cls_loss + loss
            logits.append(z)
            hidden.append(h)
        terms["cls"] = cls_loss
        with torch.no_grad():
            scores = [self._eps(z.detach(), target) for z in logits]
            if not self._checked:
                self._first_step_checks(output, scores)
            eps = torch.stack(scores).float()
            delta = eps - self.eps_prev
            self.eps_prev.copy_(eps)
            coeff, raw = magnitude_coefficients(delta, stabilize=cfg.stabilize, resolution=1.0 / target.shape[0])
            b = coeff * cfg.rho
            self._B = b
            c_dir = b if cfg.rho_in_direction else coeff
            every = cfg.grad_cos_every
            sample = cfg.direction != "paper" and every > 0 and self._step % every == 0
            grad_cos = self._grad_cos(output, target, logits, hidden) if sample else None
            self._step += 1

        gm_value = torch.zeros((), device=eps.device)
        cos = torch.zeros_like(eps)
        if cfg.direction == "official":
            # L_gm^{t-1} enters this loss; L_gm^t is built now and kept (graph to W_F) for step t+1.
            if cfg.lam > 0:
                stale = self._stale_gm
                terms["gm"] = cfg.lam * stale if stale is not None else torch.zeros((), device=eps.device)
            w_fusion = model.out_layer.weight
            # The clone is W_F at step t (the optimizer later updates W_F in place); the stack of the
            # detached head weights is a copy too, so the stale graph holds step-t values only.
            wf = w_fusion.clone().flatten() if cfg.lam > 0 else w_fusion.detach().flatten()
            w_heads = torch.stack([self.heads[m].out_layer.weight.detach() for m in self.modalities]).flatten(1)
            cos = F.cosine_similarity(w_heads, wf.unsqueeze(0), dim=1)
            gm_new = direction_loss(c_dir, cos)
            self._stale_gm = gm_new if cfg.lam > 0 else None
            gm_value = gm_new.detach()
            cos = cos.detach()
        elif cfg.direction == "paper":
            with torch.set_grad_enabled(cfg.lam > 0 and torch.is_grad_enabled()):
                g_fusion = self._fusion_gradient(output, target)
                cos = F.cosine_similarity(self._head_gradients(logits, hidden, target), g_fusion.unsqueeze(0), dim=1)
                gm = direction_loss(c_dir, cos)
            if cfg.lam > 0:
                terms["gm"] = cfg.lam * gm
            gm_value, cos = gm.detach(), cos.detach()
            grad_cos = cos
        with torch.no_grad():
            small = ((delta.sum()).abs() < 1.0 / target.shape[0]).float()
            negative = (raw < 0).any().float()
            self._step_stats = torch.cat([eps, b, cos, gm_value.reshape(1), small.reshape(1), negative.reshape(1)])
            self._grad_cos_value = grad_cos
        return terms

    def _grad_cos(self, output: ModelOutput, target: Tensor, logits: list[Tensor], hidden: list[Tensor]) -> Tensor | None:
        """Diagnostic: cos between each head's and the fusion head's closed-form task-loss gradient
        of the output-layer weight (Eq. 12's sim), computed without autograd; None if unavailable."""
        if not self._closed_form or output.head_input is None:
            return None
        g_fusion = self._fusion_gradient(output, target)
        return F.cosine_similarity(self._head_gradients(logits, hidden, target), g_fusion.unsqueeze(0), dim=1)

    def _fusion_gradient(self, output: ModelOutput, target: Tensor) -> Tensor:
        """Flattened ∂L_task/∂W_F in closed form; differentiable when grad mode is on (paper mode)."""
        return last_layer_gradient(
            output_gradient(self.task, output.prediction, target), _upcast(output.head_input),
            align_corners=self._align_corners,
        ).flatten()

    @torch.no_grad()
    def _head_gradients(self, logits: list[Tensor], hidden: list[Tensor], target: Tensor) -> Tensor:
        """``(M, K)`` flattened closed-form ∂L_i/∂W_i of the heads (constants: L_gm never moves the
        heads, as in the official code). For cls/reg the M heads are done in one batch: the
        concatenated batch rescales every gradient by 1/M, which no cosine sees."""
        if isinstance(self.task, SegmentationTask):
            return torch.stack([
                last_layer_gradient(output_gradient(self.task, z, target), _upcast(h), align_corners=True).flatten()
                for z, h in zip(logits, hidden, strict=True)
            ])
        m, batch = len(logits), logits[0].shape[0]
        g = output_gradient(self.task, torch.cat(logits), target.reshape(batch).repeat(m))
        h = _upcast(torch.stack(hidden))  # (M, B, d)
        return torch.bmm(g.reshape(m, batch, -1).transpose(1, 2).to(h.dtype), h).flatten(1)

    def on_after_backward(self, ctx: StepContext) -> None:
        """Record each encoder's gradient norm, then scale it by B_i (one fused kernel per group)."""
        norms = []
        for i, params in enumerate(self._groups):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                norms.append(self._acc_grad_norm.new_zeros(()))
                continue
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
            if self.config.magnitude:
                torch._foreach_mul_(grads, self._B[i])
        self._grad_norms = torch.stack(norms)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step and zero the heads' optimizer (through the run's GradScaler); accumulate diagnostics."""
        ctx.scaler.step(self.cls_optimizer)
        self.cls_optimizer.zero_grad(set_to_none=True)
        if self._step_stats is not None:
            self._acc += self._step_stats
            if self._grad_cos_value is not None:
                self._acc_grad_cos += self._grad_cos_value
                self._grad_cos_steps += 1
            if self._grad_norms is not None:
                self._acc_grad_norm += self._grad_norms
            torch.minimum(self._b_min, self._B, out=self._b_min)
            torch.maximum(self._b_max, self._B, out=self._b_max)
            self._diag_steps += 1

    # -- reporting ------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Epoch means (over training steps) of ε_i, B_i, cos_i, the encoder gradient norms before
        modulation, L_gm; grad_cos_i (mean over its sampled steps: every ``grad_cos_every``-th step,
        every step in paper mode); B_i's min/max; the fractions of steps with |Σ Δε| < 1/batch and
        with a negative raw coefficient. One host sync; resets the accumulators."""
        if self._diag_steps == 0:
            return {}
        m = len(self.modalities)
        n = self._diag_steps
        k = max(1, self._grad_cos_steps)
        values = torch.cat([self._acc / n, self._acc_grad_cos / k, self._acc_grad_norm / n, self._b_min, self._b_max]).tolist()
        out: dict[str, float] = {}
        for j, name in enumerate(("eps", "B", "cos")):
            for i, mod in enumerate(self.modalities):
                out[f"{name}/{mod}"] = values[j * m + i]
        base = 3 * m
        out["L_gm"] = values[base]
        out["frac_small_sum"] = values[base + 1]
        out["frac_negative_B"] = values[base + 2]
        for i, mod in enumerate(self.modalities):
            if self._grad_cos_steps:
                out[f"grad_cos/{mod}"] = values[base + 3 + i]
            out[f"grad_norm/{mod}"] = values[base + 3 + m + i]
            out[f"B_min/{mod}"] = values[base + 3 + 2 * m + i]
            out[f"B_max/{mod}"] = values[base + 3 + 3 * m + i]
        if self.config.direction is None:
            for mod in self.modalities:
                del out[f"cos/{mod}"]
            del out["L_gm"]
        self._acc.zero_()
        self._acc_grad_cos.zero_()
        self._acc_grad_norm.zero_()
        self._b_min.fill_(math.inf)
        self._b_max.fill_(-math.inf)
        self._diag_steps = 0
        self._grad_cos_steps = 0
        return out

    def retained_bytes(self) -> int:
        """Bytes held between steps by the official mode's stale L_gm graph: the clones of W_F and
        of the M head weights (not module state, so not in ``persistent_state_bytes``)."""
        if self.config.direction != "official" or self.config.lam == 0 or self._stale_gm is None:
            return 0
        w = self.__dict__["_model"].out_layer.weight
        return (len(self.modalities) + 1) * w.numel() * w.element_size()
