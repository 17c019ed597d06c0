"""THE training loop: forward, loss terms, backward, AMP unscale, hooks, clipping, optimizer step.

One :class:`Trainer` runs every method; the order of the Balancer hooks is documented in
:mod:`mmbalance.balancer` and asserted by ``tests/test_hook_order.py``. The same
:meth:`Trainer.train_step` is timed by :mod:`mmbalance.measure`, so measured cost is the loop's.

Host synchronisation: none per step. Detached loss terms are kept; every ``finite_check_every``
steps and at each epoch end they are stacked and read once, a non-finite term raises
:class:`~mmbalance.errors.NonFiniteLossError` naming the term, the step and the epoch, and the
epoch means are accumulated. A NaN is therefore detected at most ``finite_check_every`` steps late;
set it to 1 to stop on the very step (at the cost of one sync per step).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmbalance.balancer import Balancer, EpochContext, StepContext
from mmbalance.config import ConfigBase, finite, need
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset, check_batch, identity_collate
from mmbalance.errors import ConfigError, DivergedError, NonFiniteLossError
from mmbalance.models.base import MultimodalModel
from mmbalance.tasks import METRIC_HIGHER_IS_BETTER, Task

__all__ = [
    "TrainConfig",
    "Trainer",
    "FitResult",
    "fit",
    "evaluate",
    "make_optimizer_factory",
    "make_loader",
    "resolve_device",
    "seed_everything",
]

OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["none", "plateau", "cosine"]  # plateau: ReduceLROnPlateau on the val loss;
# cosine: per step, linear warm-up from warmup_start_lr, then cosine to final_lr
AmpMode = Literal["none", "bf16", "fp16"]  # autocast on CUDA; fp16 adds a GradScaler
OPTIMIZERS = typing.get_args(OptimizerName)
DIVERGENCE_FACTOR = 1e3  # default TrainConfig.divergence_factor (left out of run ids at this value)


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Training setup of a run. Dataset presets (``mmbalance.presets``) hold the papers' values.

    Every field is checked against its declared type (:class:`mmbalance.config.ConfigBase`), then
    against the ranges of :meth:`check`.
    """

    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # training and evaluation batch size
    optimizer: OptimizerName = "adam"  # the main optimizer
    lr: float = 1e-3  # base (peak, for cosine) learning rate
    weight_decay: float = 0.0  # decoupled for adamw, L2 for adam/sgd
    momentum: float = 0.9  # sgd only
    scheduler: SchedulerName = "none"  # LR schedule (see SchedulerName)
    plateau_patience: int = 10  # epochs without val-loss improvement before the LR drops (CGGM `when`)
    plateau_factor: float = 0.1  # LR multiplier on plateau
    warmup_epochs: int = 0  # cosine: linear warm-up length in epochs
    warmup_start_lr: float = 0.0  # cosine: LR at step 0
    final_lr: float = 0.0  # cosine: LR at the last step
    clip_grad_norm: float | None = None  # global L2 norm clip of the model's gradients (after hooks)
    amp: AmpMode = "none"  # mixed precision on CUDA (see AmpMode)
    seed: int = 0  # seeds Python, NumPy, torch and the train loader's shuffling
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn only)
    num_workers: int = 0  # DataLoader workers (persistent, pinned memory on CUDA)
    finite_check_every: int = 50  # steps between host reads of the loss-term buffer
    max_train_batches: int | None = None  # cap on steps per epoch (smoke tests, huge datasets)
    eval_modality_scores: bool = True  # per-modality val score with the other modalities zeroed
    cost_steps: int = 30  # timed steps of the side-by-side cost measurement (0 = skip)
    cost_warmup: int = 5  # discarded warm-up steps before timing
    divergence_factor: float | None = DIVERGENCE_FACTOR  # diverged: a step's loss (its "task" term, else
    # the sum of terms) above divergence_factor * max(|first step's loss|, 1); None = never (NaN/inf always)

    def check(self) -> None:
        need(self, self.epochs >= 1, "epochs", "an integer >= 1")
        need(self, self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self, finite(self.lr) and self.lr > 0, "lr", "> 0 and finite")
        for name in ("weight_decay", "warmup_start_lr", "final_lr"):
            need(self, finite(getattr(self, name)) and getattr(self, name) >= 0, name, ">= 0 and finite")
        need(self, 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self, self.plateau_patience >= 0, "plateau_patience", "an integer >= 0")
        need(self, 0 < self.plateau_factor < 1, "plateau_factor", "in (0, 1)")
        need(self, self.warmup_epochs >= 0, "warmup_epochs", "an integer >= 0")
        clip = self.clip_grad_norm
        need(self, clip is None or (finite(clip) and clip > 0), "clip_grad_norm", "None or > 0 and finite")
        need(self, 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)")
        need(self, self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(self, self.finite_check_every >= 1, "finite_check_every", "an integer >= 1")
        cap = self.max_train_batches
        need(self, cap is None or cap >= 1, "max_train_batches", "None or an integer >= 1")
        need(self, self.cost_steps >= 0, "cost_steps", "an integer >= 0")
        need(self, self.cost_warmup >= 0, "cost_warmup", "an integer >= 0")
        factor = self.divergence_factor
        ok = factor is None or (finite(factor) and factor > 1)
        need(self, ok, "divergence_factor", "None or > 1 and finite")


# -- environment ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises ConfigError for CUDA without a GPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on request make torch's kernels deterministic (warn only)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        _set_deterministic(True)


def _set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` without its import of
    ``torch._inductor.config`` (about 5 s on a 2-core machine, paid by every run process) unless
    inductor is already loaded; mmbalance does not compile, so only the ATen flag matters."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=True)


def make_optimizer_factory(cfg: TrainConfig) -> Callable[..., torch.optim.Optimizer]:
    """``factory(params, lr=None, **overrides)`` building the run's optimizer type.

    Balancers use it for their own optimizers so that, e.g., CGGM heads get Adam on MOSI and SGD
    on BraTS, as the official code does.
    """

    def factory(params: Any, lr: float | None = None, **overrides: Any) -> torch.optim.Optimizer:
        kind = overrides.pop("optimizer", cfg.optimizer)
        wd = overrides.pop("weight_decay", cfg.weight_decay)
        lr = cfg.lr if lr is None else lr
        if kind == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd, **overrides)
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **overrides)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=overrides.pop("momentum", cfg.momentum), weight_decay=wd, **overrides)
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")

    return factory


def make_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, *, train: bool) -> DataLoader:
    """DataLoader: shuffled with a seeded generator for training; never drops the last batch."""
    generator = torch.Generator().manual_seed(cfg.seed) if train else None
    batched = isinstance(dataset, TensorDictDataset) or hasattr(dataset, "__getitems__")
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kwargs.update(num_workers=cfg.num_workers, persistent_workers=True)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        generator=generator,
        drop_last=False,
        collate_fn=identity_collate if batched else None,
        pin_memory=device.type == "cuda",
        **kwargs,
    )


def batch_to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none" or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def cosine_lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step LR multiplier: linear warm-up from ``warmup_start_lr`` to ``lr``, then cosine to
    ``final_lr`` (the CGGM BraTS schedule, ``eval_metrics.cosine_scheduler``)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch

    def fn(step: int) -> float:
        if step < warm:
            lr = cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / warm
        else:
            progress = min(1.0, (step - warm) / max(1, total - warm))
            lr = cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))
        return lr / cfg.lr

    return fn


# -- the step ------------------------------------------------------------------------------------
class Trainer:
    """Owns model, balancer, optimizer, scaler and scheduler for one run; runs steps and epochs."""

    def __init__(
        self,
        model: MultimodalModel,
        balancer: Balancer,
        task: Task,
        cfg: TrainConfig,
        device: torch.device,
        steps_per_epoch: int = 1,
    ) -> None:
        self.model = model.to(device)
        self.balancer = balancer
        self.task = task
        self.cfg = cfg
        self.device = device
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.optimizer_factory = make_optimizer_factory(cfg)
        self.optimizer = self.optimizer_factory([p for p in model.parameters() if p.requires_grad])
        balancer.setup(self.model, task, self.optimizer_factory)
        balancer.to(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
        self.scheduler: Any = None
        if cfg.scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
            )
        elif cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_lr_lambda(cfg, self.steps_per_epoch))
        self.clip_params = [p for p in model.parameters() if p.requires_grad]
        self.global_step = 0
        # deferred finiteness check: one row of term values per step, read every N steps
        self._term_names: tuple[str, ...] | None = None
        self._term_rows: list[list[Tensor]] = []
        self._buf_first_step = 0
        self._term_sums: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}
        self._epoch = 0
        self._start_loss: float | None = None  # summed terms of the first step (divergence bound)

    # The hot path. No .item(), no host reads.
    def train_step(self, batch: Mapping[str, Tensor], epoch: int, step_in_epoch: int) -> None:
        model, balancer, opt, scaler = self.model, self.balancer, self.optimizer, self.scaler
        with _autocast(self.cfg, self.device):
            output = balancer.forward_step(model, batch)
            terms = balancer.loss_terms(output, batch, self.task)
        self._record_terms(terms, epoch)
        balancer.backward(terms, scaler)
        scaler.unscale_(opt)
        ctx = StepContext(
            model=model,
            batch=batch,
            output=output,
            terms=terms,
            optimizer=opt,
            scaler=scaler,
            step=self.global_step,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
        )
        balancer.on_after_backward(ctx)
        if self.cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.clip_params, self.cfg.clip_grad_norm, foreach=True)
        scaler.step(opt)
        balancer.on_after_optimizer_step(ctx)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if self.cfg.scheduler == "cosine":
            self.scheduler.step()
        self.global_step += 1

    def _record_terms(self, terms: Mapping[str, Tensor], epoch: int) -> None:
        # Hot path: keep detached references only; stacking and the host read happen in flush_terms.
        names = tuple(terms)
        if names != self._term_names:
            self.flush_terms()
            self._term_names = names
        if not self._term_rows:
            self._buf_first_step = self.global_step
            self._epoch = epoch
        self._term_rows.append([t.detach() for t in terms.values()])
        if len(self._term_rows) == self.cfg.finite_check_every:
            self.flush_terms()

    def flush_terms(self) -> None:
        """Read the recorded terms once: raise on a non-finite term, add to the epoch means."""
        if not self._term_rows or self._term_names is None:
            return
        rows = torch.stack([torch.stack([t.float().reshape(()) for t in row]) for row in self._term_rows]).double().cpu()
        self._term_rows = []
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            bad_row, bad_col = (~finite).nonzero()[0].tolist()
            name = self._term_names[bad_col]
            raise NonFiniteLossError(
                f"loss term {name!r} is {rows[bad_row, bad_col].item()} at step {self._buf_first_step + bad_row} "
                f"(epoch {self._epoch}); terms at that step: "
                + ", ".join(f"{n}={rows[bad_row, i].item():.4g}" for i, n in enumerate(self._term_names)),
                step=self._buf_first_step + bad_row,
                epoch=self._epoch,
            )
        self._check_divergence(rows)
        sums = rows.sum(dim=0).tolist()
        for n, s in zip(self._term_names, sums, strict=True):
            self._term_sums[n] = self._term_sums.get(n, 0.0) + s
            self._term_counts[n] = self._term_counts.get(n, 0) + len(rows)

    def _check_divergence(self, rows: Tensor) -> None:
        """Raise DivergedError at the first step whose loss exceeds the bound (``rows``: host tensor,
        steps x terms). The loss is the ``task`` term when there is one (auxiliary terms such as
        CGGM's L_gm may grow by orders of magnitude by design), else the sum of the terms."""
        names = self._term_names or ()
        losses = rows[:, names.index("task")] if "task" in names else rows.sum(dim=1)
        if self._start_loss is None:
            self._start_loss = float(losses[0])
        if self.cfg.divergence_factor is None:
            return
        bound = self.cfg.divergence_factor * max(abs(self._start_loss), 1.0)
        over = (losses > bound).nonzero()
        if len(over):
            i = int(over[0, 0])
            step = self._buf_first_step + i
            raise DivergedError(
                f"loss {float(losses[i]):.4g} at step {step} (epoch {self._epoch}) is above "
                f"divergence_factor {self.cfg.divergence_factor:g} x max(|first step's loss "
                f"{self._start_loss:.4g}|, 1)",
                step=step,
                epoch=self._epoch,
            )

    def pop_epoch_terms(self) -> dict[str, float]:
        self.flush_terms()
        out = {n: self._term_sums[n] / self._term_counts[n] for n in self._term_sums}
        self._term_sums, self._term_counts = {}, {}
        return out

    def train_epoch(self, loader: DataLoader, epoch: int, progress: Any = None) -> dict[str, Any]:
        """One epoch; returns loss-term means, LR, wall time and the time spent waiting on data."""
        self.model.train()
        self.balancer.train()
        t0 = time.perf_counter()
        wait = 0.0
        it: Iterator = iter(loader)
        step = 0
        while True:
            if self.cfg.max_train_batches is not None and step >= self.cfg.max_train_batches:
                break
            tw = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = batch_to_device(batch, self.device)
            wait += time.perf_counter() - tw
            self.train_step(batch, epoch, step)
            step += 1
            if progress is not None:
                progress.update(1)
        terms = self.pop_epoch_terms()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {
            "terms": terms,
            "train_loss": sum(terms.values()),
            "steps": step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t0,
            "loader_wait_s": wait,
        }


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    balancer: Balancer,
    loader: DataLoader,
    task: Task,
    device: torch.device,
    cfg: TrainConfig,
    *,
    modality_scores: bool = True,
) -> dict[str, float]:
    """Metric suite of ``balancer.predict`` over the whole loader, plus the mean loss and, with
    ``modality_scores``, ``score/<m>``: the task score of the method's own test-time predictor
    (``balancer.predict``) when every other modality's encoder output is zeroed (encoders run once
    per batch). For late-fusion methods (QMF, MLA, UME, ReconBoost) that is their own heads' fusion,
    not the model's unused fusion head. One host sync at the end."""
    model.eval()
    balancer.eval()
    suite = task.metrics()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    score_sums = {m: torch.zeros((), device=device, dtype=torch.float64) for m in model.modalities}
    n = 0
    for batch in loader:
        batch = batch_to_device(batch, device)
        with _autocast(cfg, device):
            features, extras = model.encode(batch)
            output = model.fuse(features, extras)
            prediction = balancer.predict(output).float()
            loss_sum += task.loss(prediction, batch["target"], reduction="none").double().sum()
            suite.update(prediction, batch["target"])
            bsz = batch["target"].shape[0]
            if modality_scores and len(model.modalities) > 1:
                for m in model.modalities:
                    only = {k: (f if k == m else torch.zeros_like(f)) for k, f in features.items()}
                    pred_m = balancer.predict(model.fuse(only, extras)).float()
                    score_sums[m] += task.score(pred_m, batch["target"]).double() * bsz
        n += bsz
    if n == 0:
        raise ConfigError("evaluation loader is empty; expected at least one sample")
    metrics = dict(suite.compute())
    metrics["loss"] = float(loss_sum) / n
    if modality_scores and len(model.modalities) > 1:
        for m, s in score_sums.items():
            metrics[f"score/{m}"] = float(s) / n
    return metrics


def is_better(task: Task, new: Mapping[str, float], best: Mapping[str, float] | None) -> bool:
    """Model selection on the task's primary validation metric (ties keep the earlier epoch)."""
    if best is None:
        return True
    key = task.primary_metric
    a, b = new[key], best[key]
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if METRIC_HIGHER_IS_BETTER[key] else a < b


@dataclass
class FitResult:
    """Outcome of :func:`fit`: validation and test metrics at the best-validation epoch."""

    val: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    steps: int = 0
    best_state: dict[str, Any] | None = None
    trainer: Trainer | None = None


def _frozen_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copy of the state that training can change: frozen parameters (e.g. the 195 M-parameter
    ViT/BERT extractors of Food-101) never change, so they are not copied at every best epoch."""
    frozen = _frozen_names(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in frozen}


def _restore(module: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
    missing, unexpected = module.load_state_dict(snapshot, strict=False)
    not_frozen = set(missing) - _frozen_names(module)
    if not_frozen or unexpected:
        raise RuntimeError(f"best-state restore mismatch: missing {sorted(not_frozen)}, unexpected {sorted(unexpected)}")


def fit(
    model: MultimodalModel,
    balancer: Balancer,
    splits: Mapping[str, Dataset],
    spec: DatasetSpec,
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    *,
    quiet: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train with validation every epoch, keep the best-validation state, test it once.

    ``splits`` maps "train", "val", "test" to datasets. The first training batch is checked
    against ``spec`` (ShapeError on a mismatch). Test data is read exactly once, at the end.
    """
    from tqdm.auto import tqdm

    for s in ("train", "val", "test"):
        if s not in splits:
            raise ConfigError(f"splits must contain 'train', 'val' and 'test', missing {s!r}")
    balancer.check_supported(spec)
    train_loader = make_loader(splits["train"], cfg, device, train=True)
    val_loader = make_loader(splits["val"], cfg, device, train=False)
    first = next(iter(train_loader))
    check_batch(first, spec, source=f"dataset split 'train' ({type(splits['train']).__name__})")
    steps_per_epoch = len(train_loader) if cfg.max_train_batches is None else min(len(train_loader), cfg.max_train_batches)
    trainer = Trainer(model, balancer, task, cfg, device, steps_per_epoch)
    history: list[dict[str, Any]] = []
    best_val: dict[str, float] | None = None
    best_epoch = -1
    best_state: dict[str, Any] | None = None
    t_start = time.perf_counter()
    progress = tqdm(total=cfg.epochs * steps_per_epoch, disable=quiet, desc=f"{balancer.name}", leave=False)
    for epoch in range(cfg.epochs):
        trainer.model.train()
        balancer.on_train_epoch_start(
            EpochContext(
                model=trainer.model,
                epoch=epoch,
                num_epochs=cfg.epochs,
                train_loader=train_loader,
                val_loader=val_loader,
                task=task,
                device=device,
                optimizer=trainer.optimizer,
                to_device=lambda b: batch_to_device(b, device),
            )
        )
        record = trainer.train_epoch(train_loader, epoch, progress)
        val = evaluate(trainer.model, balancer, val_loader, task, device, cfg, modality_scores=cfg.eval_modality_scores)
        if cfg.scheduler == "plateau":
            trainer.scheduler.step(val["loss"])
        balancer.on_validation_end(epoch, val)
        record.update(epoch=epoch, val=val, diagnostics=balancer.diagnostics())
        history.append(record)
        if is_better(task, val, best_val):
            best_val, best_epoch = val, epoch
            best_state = {"model": _snapshot(trainer.model), "balancer": _snapshot(balancer)}
        if on_epoch_end is not None:
            on_epoch_end(record)
        progress.set_postfix(loss=f"{record['train_loss']:.4f}", val=f"{val[task.primary_metric]:.4f}")
    progress.close()
    train_time = time.perf_counter() - t_start
    assert best_state is not None and best_val is not None
    _restore(trainer.model, best_state["model"])
    _restore(balancer, best_state["balancer"])
    test_loader = make_loader(splits["test"], cfg, device, train=False)
    test = evaluate(trainer.model, balancer, test_loader, task, device, cfg, modality_scores=cfg.eval_modality_scores)
    return FitResult(
        val=best_val,
        test=test,
        best_epoch=best_epoch,
        history=history,
        train_time_s=train_time,
        steps=trainer.global_step,
        best_state=best_state,
        trainer=trainer,
    )

