"""``cggm``: Classifier-Guided Gradient Modulation (Guo, Jin, Chen, Zhao; NeurIPS 2024; arXiv 2411.01409).

Port of ``zrguo/CGGM`` (``src/msatrain.py``, ``src/foodtrain.py``, ``src/segtrain.py``,
``models/msamodel.py``, ``src/eval_metrics.py``); card ``methods/cggm.md``. A classifier head f_i
(:mod:`~mmbalance.methods._cggm_heads`) reads each modality's *detached* encoder output; its batch
metric ε_i gives Δε_i = ε_i^t − ε_i^{t−1} and B_i = ρ c_i (Eq. 7), which scales modality i's
encoder gradient (Eq. 8); the direction term L_gm (Eq. 12) enters the loss with weight λ (Eq. 13).
Formulas: :mod:`~mmbalance.methods._cggm_formulas`. No second pass through encoders or fusion, no
host sync per step; ε, Δε, Σ Δε + 1e-8, B and L_gm's coefficients in float64, as the official
Python floats. Deviations (card): ``direction="paper"`` (closed-form gradients), ``stabilize=True``
(bounded B), the default heads apply ``proj1`` once (``head="msa"``: twice, as released), one
backward instead of two (same gradients). ``side_stream=True`` queues the heads on a second CUDA
stream (same results; off by default until measured faster).

Python API beyond the Config: ``CGGM(config, head_factory)`` takes any head factory
(``_cggm_heads.HeadFactory``; the config then says ``head="custom"``), and ``trace=True`` (records
in ``trace_records``) or ``trace=callback`` gives each step's ε, Δε, B (raw and applied), cosines and
L_gm as float64 device tensors (no host sync; nothing is recorded when off).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import Balancer, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.epoch_means import EpochMeans
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._cggm_checks import check_first_batch, check_setup
from mmbalance.methods._cggm_formulas import (
    batch_metric,
    direction_loss,
    gradient_cosines,
    magnitude_coefficients,
)
from mmbalance.methods._cggm_heads import CUSTOM_HEAD, HEAD_FACTORIES, CGGMHeads, HeadFactory, resolve_head
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import present_grads, scale_grads_
from mmbalance.methods._heads import head_term
from mmbalance.methods._stages import target_size
from mmbalance.methods._streams import SideStream
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["CGGM", "CGGMConfig", "DIRECTIONS", "EPS_METRICS"]

DIRECTIONS = ("official", "paper")
EPS_METRICS = ("score", "neg_mae")


@dataclass(frozen=True)
class CGGMConfig(HeadConfig):
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
    head: str = "auto"  # registered head factory: "auto" | "msa" (official Classifier) | "linear" | "custom"
    side_stream: bool = False  # CUDA: heads f_i on a second stream, beside the main backward (same results)

    def check(self) -> None:
        if isinstance(self.direction, str) and self.direction.lower() in ("none", "null", ""):
            object.__setattr__(self, "direction", None)
        need(self, self.direction in (*DIRECTIONS, None), "direction", f"one of {DIRECTIONS} or None")
        if self.rho_in_direction is None:
            object.__setattr__(self, "rho_in_direction", self.direction == "paper")
        need(self, finite(self.rho) and self.rho > 0, "rho", "a finite number > 0")
        need(self, finite(self.lam) and self.lam >= 0, "lam", "a finite number >= 0")
        need(self, finite(self.cls_lr) and self.cls_lr > 0, "cls_lr", "> 0")
        wd = self.cls_weight_decay
        need(self, wd is None or wd >= 0, "cls_weight_decay", "None or >= 0")
        need(self, self.eps_metric in EPS_METRICS, "eps_metric", f"one of {EPS_METRICS}")
        need(self, self.head_heads is None or self.head_heads >= 1, "head_heads", "None or an integer >= 1")
        need(self, 0 <= self.head_dropout < 1, "head_dropout", "in [0, 1)")
        need(self, self.grad_cos_every >= 0, "grad_cos_every", "an integer >= 0")
        known = (*sorted(HEAD_FACTORIES), CUSTOM_HEAD)
        need(self, self.head in known, "head", f"one of {known} (more: _cggm_heads.register_head)")


@register_method("cggm")
class CGGM(Balancer):
    """Classifier-guided gradient modulation: magnitude (Eq. 7-8) and direction (Eq. 12-13).

    Hook use: ``loss_terms`` runs the heads on detached features, computes ε, B and L_gm, and adds
    the terms ``unimodal/<m>`` (each head's task loss; official ``cls_loss``) and ``gm`` (λ·L_gm);
    ``on_after_backward`` scales each encoder's gradients by B_i (after AMP unscale, before clip);
    ``on_after_optimizer_step`` steps the heads' optimizer through the run's scaler.
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
    grad_edit_scope = frozenset({"encoders"})
    paper = "Guo et al., NeurIPS 2024 (zrguo/CGGM)"

    def __init__(self, config: CGGMConfig | None = None, head_factory: HeadFactory | None = None, *,
                 trace: bool | Callable[[dict[str, Tensor]], None] = False) -> None:
        config, self._head_factory = resolve_head(config or CGGMConfig(), head_factory)
        super().__init__(config)
        if not (isinstance(trace, bool) or callable(trace)):
            raise ConfigError(f"trace must be True, False or a callable, got {trace!r}")
        self._trace = trace
        self.trace_records: list[dict[str, Tensor]] = []  # with trace=True: one record per step
        self._groups: list[list[nn.Parameter]] = []
        self._has_stale = False  # official: whether the stale_* buffers hold the previous step's L_gm
        self._B: Tensor | None = None  # this step's ρ·c, read by on_after_backward
        self._stats: dict[str, Tensor] = {}  # this step's diagnostics, recorded after the step
        self._grad_cos_value: Tensor | None = None  # this step's grad_cos sample, if any
        self._step = 0  # training steps seen (host counter, for the grad_cos sampling)
        # first-batch checks done; closed-form gradients apply; the logits' upsampling align_corners
        self._checked, self._closed_form, self._align_corners = False, False, None

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        """Validate task and model, precompute the encoder parameter groups, create the heads (built
        on the first training batch: feature shapes are unknown before it)."""
        super().setup(model, task, optimizer_factory)
        cfg = self.config
        self._groups = check_setup(model, task, cfg, self.tasks)
        exact = "exact" in inspect.signature(task.score).parameters  # else: float32, widened
        self._metric = functools.partial(batch_metric, task, eps_metric=cfg.eps_metric, exact=exact)  # ε

        def factory(feature: Tensor, modality: str) -> nn.Module:
            kwargs = {"out_layer": model.out_layer, "num_outputs": task.num_outputs, "config": cfg}
            return self._head_factory(feature, modality=modality, **kwargs)

        options = {} if cfg.cls_weight_decay is None else {"weight_decay": cfg.cls_weight_decay}
        self.heads = CGGMHeads(
            self.modalities, factory, seed=(torch.initial_seed() + 0x5EED) % (2**63),
            dtype=model.out_layer.weight.dtype, optimizer_factory=optimizer_factory, lr=cfg.cls_lr,
            optimizer_options=options,
        )
        # ε^{t-1} (official `acc1`, Python floats): ε^0 = 0, never reset
        self.register_buffer("eps_prev", torch.zeros(len(self.modalities), dtype=torch.float64))
        if cfg.direction == "official" and cfg.lam > 0:  # the inputs of the previous step's L_gm
            w, m = model.out_layer.weight, len(self.modalities)
            self.register_buffer("stale_coeff", torch.zeros(m, dtype=torch.float64, device=w.device))
            self.register_buffer("stale_heads", w.new_zeros(m, w.numel()))
            self.register_buffer("stale_fusion", w.new_zeros(w.numel()))
        self._side = SideStream(cfg.side_stream)  # warned by check_setup when the model is not on CUDA
        self._grad_cos_means = EpochMeans(self.modalities)  # over the sampled steps only
        self._extremes = tuple(EpochMeans(self.modalities, reduction=r) for r in ("min", "max"))

    # -- the step -------------------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """The heads' forward, their losses, ε, Δε and B read the detached features and the target only:
        with ``side_stream`` on CUDA they are queued on a second stream (:mod:`._streams`), and autograd
        runs the heads' backward there too, beside the main backward. The rest stays on the main stream."""
        cfg, target, resolution = self.config, batch["target"], 1.0 / batch["target"].shape[0]
        terms = {"task": task.loss(output.prediction, target)}
        with self._side.scope([*output.features.values(), target]) as hand_over:
            logits, hidden = self.heads(output.features, target_size(batch))
            for m, z in zip(self.modalities, logits, strict=True):
                terms[head_term(m)] = task.loss(z, target)
            with torch.no_grad():
                scores = [self._metric(z.detach(), target) for z in logits]
                if not self._checked:  # once; its host read also waits for the side stream
                    self._closed_form, self._align_corners = check_first_batch(
                        self.modalities, output, scores, task, self.model.out_layer, self.heads.out_weights(),
                        cfg.direction,
                    )
                    self._checked = True
                eps = torch.stack(scores).to(torch.float64)
                delta = eps - self.eps_prev
                self.eps_prev.copy_(eps)
                coeff, raw = magnitude_coefficients(delta, stabilize=cfg.stabilize, resolution=resolution)
            hand_over(*logits, *hidden, *terms.values(), eps, delta, coeff, raw)
        with torch.no_grad():
            self._B = coeff * cfg.rho
            c_dir = self._B if cfg.rho_in_direction else coeff
            every = cfg.grad_cos_every
            sample = cfg.direction != "paper" and every > 0 and self._step % every == 0
            self._grad_cos_value = self._cosines(output, target, logits, hidden) if sample else None
            self._step += 1
        if cfg.direction == "official":
            gm, cos = self._official_direction(c_dir, terms)
        elif cfg.direction == "paper":
            with torch.set_grad_enabled(cfg.lam > 0 and torch.is_grad_enabled()):
                cos = self._cosines(output, target, logits, hidden)
                gm = direction_loss(c_dir, cos)
            if cfg.lam > 0:
                terms["gm"] = (cfg.lam * gm).to(terms["task"].dtype)
            gm, cos = gm.detach(), cos.detach()
            self._grad_cos_value = cos
        if self._trace:
            record = {"eps": eps, "delta": delta, "B_raw": raw * cfg.rho, "B": self._B}
            if cfg.direction is not None:
                record.update(cos=cos.to(torch.float64), L_gm=gm.to(torch.float64))
            (self._trace if callable(self._trace) else self.trace_records.append)(record)
        with torch.no_grad():
            self._stats = {"eps": eps, "B": self._B}
            if cfg.direction is not None:
                self._stats.update(cos=cos, L_gm=gm)
            self._stats["frac_small_sum"] = (delta.sum().abs() < resolution).float()
            self._stats["frac_negative_B"] = (raw < 0).any().float()
        return terms

    def _official_direction(self, c_dir: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``src/msatrain.py``: the previous step's L_gm enters this loss, its gradient taken at the
        previous step's weights and reaching W_F only; this step's L_gm (cosines of the output-layer
        weights, one per head as ``cal_cos``) is computed now. Its inputs are kept in buffers, not
        as a graph, so they are state: a resumed run continues as an uninterrupted one."""
        lam = self.config.lam
        w_fusion = self.model.out_layer.weight.flatten()
        heads = [w.detach().flatten() for w in self.heads.out_weights()]
        if lam > 0:
            dtype = terms["task"].dtype
            terms["gm"] = w_fusion.new_zeros((), dtype=dtype)
            if self._has_stale:  # value W_F^{t-1}, gradient into W_F: x - x.detach() is 0 with slope 1
                proxy = self.stale_fusion + (w_fusion - w_fusion.detach())
                cos = torch.stack([F.cosine_similarity(h, proxy, dim=0) for h in self.stale_heads])
                terms["gm"] = (lam * direction_loss(self.stale_coeff, cos)).to(dtype)
        with torch.no_grad():
            wf = w_fusion.detach()
            cos = torch.stack([F.cosine_similarity(h, wf, dim=0) for h in heads])
            gm = direction_loss(c_dir, cos)
            if lam > 0:  # new tensors: the stale term's graph saved the current ones
                self.stale_coeff, self.stale_heads, self.stale_fusion = c_dir, torch.stack(heads), wf.clone()
                self._has_stale = True
        return gm, cos

    def _cosines(
        self, output: ModelOutput, target: Tensor, logits: list[Tensor], hidden: list[Tensor]
    ) -> Tensor | None:
        """Eq. 12's sim in closed form (paper mode's cosines, and the ``grad_cos`` diagnostic of the
        other modes); None where the closed form does not apply to the model."""
        if not self._closed_form:
            return None
        return gradient_cosines(
            self.task, output.prediction, output.head_input, target, logits, hidden, self._align_corners
        )

    def on_after_backward(self, ctx: StepContext) -> None:
        """Record each encoder's gradient norm, then scale it by B_i (one fused kernel per group)."""
        norms = []
        for i, params in enumerate(self._groups):
            grads = present_grads(params)
            if not grads:
                norms.append(self._B.new_zeros(()))
                continue
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
            if self.config.magnitude:
                scale_grads_(params, self._B[i])
        self._stats["grad_norm"] = torch.stack(norms)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the heads' optimizer (through the run's GradScaler); record the step's diagnostics."""
        self.heads.step(ctx.scaler)
        self.epoch_means.update(**self._stats)
        if self._grad_cos_value is not None:
            self._grad_cos_means.update(grad_cos=self._grad_cos_value)
        self._extremes[0].update(B_min=self._B)
        self._extremes[1].update(B_max=self._B)

    # -- reporting ------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Epoch means over training steps of ε_i, B_i, cos_i and L_gm (with a direction term), the
        fractions of steps with |Σ Δε| < 1/batch and with a negative raw coefficient, the encoder
        gradient norms before modulation; grad_cos_i (mean over its sampled steps: every
        ``grad_cos_every``-th step, every step in paper mode); B_i's min and max. Resets them."""
        out = self.epoch_means.pop()
        for means in (self._grad_cos_means, *self._extremes):
            out.update(means.pop())
        return out

    def host_state(self) -> dict[str, Any]:
        """The step counter of the grad_cos sampling; whether a previous L_gm is stored."""
        return {"step": self._step, "has_stale": self._has_stale}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._step, self._has_stale = int(state["step"]), bool(state["has_stale"])
