"""``di_mml``: Detached and Interactive Multimodal Learning (Fan, Xu, Wang, Liu, Guo, ACM MM 2024).

No joint loss reaches the encoders, so the modalities cannot compete: each encoder learns with its
own classifier's loss and a classifier shared by all modalities (one common feature space). From
``contrast_start`` on, the dimension-decoupled unidirectional contrastive (DUC) loss lets modality n
learn, on the dimensions that only modality m classifies well (found once from class centroids on the
training split), to match m's detached features of the same sample against the batch. At inference
the own classifiers' and the fusion's logits are combined with certainty weights
``w_k = softmax_k(max_c p_k,c / T)``, per sample.

Port of ``fanyunfeng-bit/DI-MML`` (``main_CFT.py``: ``train_epoch``, ``get_indices``;
``loss/contrast_loss.py``: ``SupConLoss``; ``main_CFT_stage2.py``: ``valid_combine_classifier``).
Deviations (``methods/di_mml.md``): one run instead of two scripts (the model's fusion and head learn
on detached features alongside; ``fusion_epochs`` are the stage-2 epochs on frozen encoders, 0 by
default); more than two modalities (each learns every other's own dimensions, averaged); a
numerically stable log-softmax in the DUC loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._stages import eval_mode, isolated_rng, iterate, stage_loader, stage_seed
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import pool_features
from mmbalance.tasks import Task

__all__ = ["DIMML", "DIMMLConfig", "effective_dimensions", "own_dimensions", "duc_loss", "certainty_fusion"]

SHARED = "shared"


@dataclass(frozen=True)
class DIMMLConfig(HeadConfig):
    temperature: float = 1.0  # τ of the DUC loss (main_CFT.py --temperature; run.sh: 50 CREMA-D, 10 AVE)
    align_weight: float = 1.0  # weight of the shared-classifier losses (main_CFT.py --weight)
    contrast_start: int = 20  # first epoch (0-based) of the DUC loss, dims found at its start (main_CFT.py)
    fusion_temperature: float = 1.0  # T of the certainty weights (main_CFT_stage2.py --temperature)
    fusion_epochs: int = 0  # last epochs training the fusion alone on frozen encoders (stage 2: 20)
    scan_batches: int | None = None  # cap on training batches of the dimension scan (None = the split)
    head_lr: float | None = None  # LR of the own and shared classifiers (None = the run's, one SGD)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features into d dimensions

    def check(self) -> None:
        for name in ("temperature", "fusion_temperature"):
            value = getattr(self, name)
            need(self, finite(value) and value > 0, name, "a finite number > 0")
        weight = self.align_weight
        need(self, finite(weight) and weight >= 0, "align_weight", "a finite number >= 0")
        need(self, self.contrast_start >= 0, "contrast_start", "an integer >= 0")
        need(self, self.fusion_epochs >= 0, "fusion_epochs", "an integer >= 0")
        cap = self.scan_batches
        need(self, cap is None or cap >= 1, "scan_batches", "None or an integer >= 1")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_di_mml.py) -------------
def effective_dimensions(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(d,)`` bool: the dimensions whose nearest class centroid classifies better than average.

    Per sample i and dimension j the predicted class is ``argmin_k |f_ij − c_kj|`` (``c_k``: the mean
    feature of class k; a class without samples is never nearest); a dimension's accuracy is the share
    of samples it predicts right; effective are the dimensions above the mean accuracy (``get_indices``).
    ``features``: ``(N, d)``; ``labels``: ``(N,)`` class indices.

    Raises:
        ConfigError: no samples.
    """
    if features.shape[0] == 0:
        raise ConfigError("the effective-dimension scan saw no training sample; expected at least one")
    f, y = features.float(), labels.long()
    counts = torch.bincount(y, minlength=num_classes)
    centroids = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, y, f)
    centroids = centroids / counts.clamp_min(1).unsqueeze(1)
    absent = (counts == 0).reshape(1, -1, 1)
    correct = torch.zeros(f.shape[1], dtype=torch.long, device=f.device)
    chunk = max(1, 2**22 // max(1, num_classes * f.shape[1]))  # bounds the (chunk, K, d) distances
    for start in range(0, f.shape[0], chunk):
        dist = (f[start:start + chunk].unsqueeze(1) - centroids).abs().masked_fill(absent, torch.inf)
        correct += (dist.argmin(dim=1) == y[start:start + chunk].unsqueeze(1)).sum(dim=0)
    accuracy = correct.double() / f.shape[0]
    return accuracy > accuracy.mean()


def own_dimensions(effective: Tensor) -> Tensor:
    """``(M, d)`` bool: the effective dimensions of each modality that no other modality shares
    (two modalities: ``audio_only = top_a − top_v``, ``image_only = top_v − top_a``)."""
    return effective & (effective.sum(dim=0, keepdim=True) == 1)


def duc_loss(features: Mapping[str, Tensor], own: Tensor, temperature: float) -> Tensor:
    """DUC loss ``Σ_n mean_{m≠n} CE(s^{n←m}, diag)`` with ``s^{n←m}_ij = <f_n,i, sg(f_m,j)>_{D_m} / τ``:
    modality n learns, on the own dimensions ``D_m`` of modality m (a row of ``own``), to pick the
    sample's own m-feature (detached) out of the batch. Two modalities: the official ``v_loss + a_loss``.
    ``features``: ``{m: (B, d)}`` in ``own``'s row order. Masks multiply (no data-dependent shapes)."""
    names = list(features)
    first = features[names[0]]
    expected = (len(names), first.shape[1])
    if own.shape != expected:
        raise ShapeError(f"own dimensions have shape {tuple(own.shape)}, expected {expected}")
    target = torch.arange(first.shape[0], device=first.device)
    total = first.new_zeros((), dtype=torch.float32)
    for i, n in enumerate(names):
        for j, m in enumerate(names):
            if i != j:
                mask = own[j].to(torch.float32)
                logits = (features[n].float() * mask) @ (features[m].detach().float() * mask).T
                total = total + F.cross_entropy(logits / temperature, target)
    return total / (len(names) - 1)


def certainty_fusion(logits: Sequence[Tensor], temperature: float) -> Tensor:
    """``Σ_k w_k l_k`` with per-sample ``w_k = softmax_k(max_c softmax(l_k)_c / T)`` over the
    predictors k (``valid_combine_classifier``). Each logit tensor is ``(B, K)``."""
    stacked = torch.stack([x.float() for x in logits])
    weights = torch.softmax(stacked.softmax(dim=2).amax(dim=2) / temperature, dim=0)
    return (weights.unsqueeze(2) * stacked).sum(dim=0)


def _check_widths(features: Mapping[str, Tensor]) -> None:
    widths = {m: (f.dim(), int(f.shape[1] if f.dim() == 4 else f.shape[-1])) for m, f in features.items()}
    if len(set(widths.values())) != 1:
        raise ShapeError(f"di_mml compares features dimension by dimension; (rank, width) differ: {widths}")


@register_method("di_mml")
class DIMML(HeadedBalancer):
    """DI-MML: detached unimodal training, shared classifier, DUC interaction, certainty-aware fusion."""

    Config = DIMMLConfig
    tasks = frozenset({"cls"})
    heads_detach = False  # the own classifiers' loss trains the encoders (it is their only objective)
    paper = "Fan et al., ACM MM 2024 (fanyunfeng-bit/DI-MML)"
    presets = {
        # run.sh: main_CFT.py / main_CFT_stage2.py --temperature; main_CFT_stage2.py --epochs 20
        "cremad": {"temperature": 50.0, "fusion_temperature": 1.0, "fusion_epochs": 20},
        "ave": {"temperature": 10.0, "fusion_temperature": 3.0, "fusion_epochs": 20},
        "ucf101": {"temperature": 10.0, "fusion_temperature": 1.0, "fusion_epochs": 20},
        "modelnet40": {"temperature": 50.0, "fusion_temperature": 3.0, "fusion_epochs": 20},
        # Not from the paper: the 8-epoch synthetic benchmark, 20 of the official 150 + 20 epochs scaled.
        "synthetic": {"contrast_start": 1, "fusion_epochs": 1},
    }

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: DIMMLConfig = self.config
        # the classifier shared by every modality, initialised from a stream apart from the own heads'
        self.shared = UnimodalHeads(
            (SHARED,), task.name, int(task.num_outputs), sequence_pool=cfg.sequence_pool, detach=False,
            seed=(torch.initial_seed() + 104_729) % 2**63, optimizer_factory=optimizer_factory,
            lr=cfg.head_lr,
        )
        self.register_buffer("own_dims", torch.zeros(len(self.modalities), 0, dtype=torch.bool))
        self.register_buffer("dims_found", torch.zeros((), dtype=torch.bool))
        self._contrast, self._fusion_only = False, False

    def _load_from_state_dict(self, state: Mapping[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        saved = state.get(prefix + "own_dims")
        if isinstance(saved, Tensor) and saved.shape != self.own_dims.shape:  # sized by the scan: follow it
            self.own_dims = torch.zeros_like(saved, device=self.own_dims.device)
        super()._load_from_state_dict(state, prefix, *args, **kw)

    # -- epoch-level work ---------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Set the epoch's stage; at the first DUC epoch, find each modality's own dimensions."""
        cfg: DIMMLConfig = self.config
        if cfg.fusion_epochs >= ctx.num_epochs:
            raise ConfigError(
                f"di_mml fusion_epochs must be smaller than the run's epochs ({ctx.num_epochs}), "
                f"got {cfg.fusion_epochs}: the encoders would never train"
            )
        self._fusion_only = ctx.epoch >= ctx.num_epochs - cfg.fusion_epochs
        self._contrast = ctx.epoch >= cfg.contrast_start and not self._fusion_only
        if self._contrast and not bool(self.dims_found):
            self.find_dimensions(ctx)

    @torch.no_grad()
    def find_dimensions(self, ctx: EpochContext) -> None:
        """One pass over the training split (encoders in eval mode, a private loader, forked RNG):
        pooled features per modality, effective dimensions, then each modality's own ones."""
        cfg: DIMMLConfig = self.config
        pooled: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        labels: list[Tensor] = []
        with isolated_rng(ctx.device), eval_mode(ctx.model):
            loader = stage_loader(ctx.train_loader, shuffle=False, seed=stage_seed(ctx.epoch))
            for batch in iterate(loader, ctx.to_device, cfg.scan_batches):
                features, _ = ctx.model.encode(batch)
                _check_widths(features)
                for m in self.modalities:
                    pooled[m].append(pool_features(features[m], cfg.sequence_pool).float())
                labels.append(batch["target"])
        if not labels:
            raise ConfigError("di_mml: the training loader yielded no batch for the dimension scan")
        y, classes = torch.cat(labels), int(ctx.task.num_outputs)
        effective = torch.stack([effective_dimensions(torch.cat(pooled[m]), y, classes) for m in pooled])
        self.own_dims = own_dimensions(effective).to(self.dims_found.device)
        self.dims_found.fill_(True)

    # -- training step ------------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders, then the model's fusion and head on detached features (the fusion learns without
        reaching the encoders). Stage 2: the encoders run frozen, in eval mode, without a graph."""
        if self._fusion_only:
            with torch.no_grad(), eval_mode(model.encoders):
                features, extras = model.encode(batch)
        else:
            features, extras = model.encode(batch)
        _check_widths(features)
        output = model.fuse({m: f.detach() for m, f in features.items()}, extras)
        output.features = features
        return output

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``task`` (fusion on detached features), ``unimodal/<m>`` (own classifier), ``align/<m>``
        (shared classifier, times ``align_weight``) and, from ``contrast_start``, ``duc``."""
        cfg: DIMMLConfig = self.config
        target = batch["target"]
        terms = {"task": task.loss(output.prediction, target)}
        if self._fusion_only:
            return terms
        features = output.features
        terms.update(self.heads.loss_terms(self.unimodal_predictions(output, batch), target, task))
        for m in self.modalities:
            shared = self.shared({SHARED: features[m]})[SHARED]
            terms[f"align/{m}"] = cfg.align_weight * task.loss(shared, target)
        if self._contrast:
            pooled = {m: pool_features(features[m], cfg.sequence_pool) for m in self.modalities}
            terms["duc"] = duc_loss(pooled, self.own_dims, cfg.temperature)
        return terms

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the own and the shared classifiers (not in stage 2, where they get no gradient)."""
        if not self._fusion_only:
            super().on_after_optimizer_step(ctx)
            self.shared.step(ctx.scaler)

    # -- inference ----------------------------------------------------------------------------------
    def predict(self, output: ModelOutput) -> Tensor:
        """Certainty-aware fusion of the own classifiers' logits and the fusion head's."""
        own = self.heads(output.features)
        logits = [own[m] for m in self.modalities] + [output.prediction]
        return certainty_fusion(logits, self.config.fusion_temperature)

    def inference_state_dict(self) -> dict[str, Any]:
        """The own classifiers are part of the test-time predictor."""
        return dict(self.heads.state_dict(prefix="heads."))

    def diagnostics(self) -> dict[str, float]:
        """Whether the own dimensions are known, and how many each modality has (``own_dims/<m>``)."""
        out = {"dims_found": float(self.dims_found)}
        if bool(self.dims_found):
            counts = self.own_dims.sum(dim=1).tolist()
            out.update({f"own_dims/{m}": float(c) for m, c in zip(self.modalities, counts, strict=True)})
        return out
