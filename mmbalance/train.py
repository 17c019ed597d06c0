"""THE training loop: forward, loss terms, backward, AMP unscale, hooks, clipping, optimizer step.

One :class:`Trainer` runs every method; the order of the Balancer hooks is documented in
:mod:`mmbalance.balancer` and asserted by ``tests/test_hook_order.py``. The same
:meth:`Trainer.train_step` is timed by :mod:`mmbalance.measure`, so measured cost is the loop's.
:func:`fit` adds validation, best-state selection and the final test (:mod:`mmbalance.evaluation`);
devices, seeding and loaders live in :mod:`mmbalance.runtime`. Both are re-exported here.

Host synchronisation: none per step. Detached loss terms are kept; every ``finite_check_every``
steps and at each epoch end they are stacked and read once, a non-finite term raises
:class:`~mmbalance.errors.NonFiniteLossError` naming the term, the step and the epoch, and the
epoch means are accumulated. A NaN is therefore detected at most ``finite_check_every`` steps late;
set it to 1 to stop on the very step (at the cost of one sync per step).
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmbalance.balancer import Balancer, EpochContext, StepContext
from mmbalance.checkpoint import FitProgress, RunCheckpoint
from mmbalance.config import ConfigBase, finite, need
from mmbalance.datasets.base import DatasetSpec, check_batch
from mmbalance.errors import ConfigError, DivergedError, NonFiniteLossError
from mmbalance.evaluation import evaluate, is_better, restore, snapshot
from mmbalance.models.base import MultimodalModel
from mmbalance.runtime import (
    autocast,
    batch_to_device,
    deterministic_attention,
    make_loader,
    resolve_device,
    seed_everything,
)
from mmbalance.tasks import Task

__all__ = [
    "TrainConfig",
    "Trainer",
    "FitResult",
    "fit",
    "make_optimizer_factory",
    "cosine_lr_lambda",
    # re-exported from mmbalance.evaluation and mmbalance.runtime
    "evaluate",
    "is_better",
    "make_loader",
    "batch_to_device",
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
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn only); CUDA: math attention kernel
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


# -- optimizer and schedule ------------------------------------------------------------------------
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
            momentum = overrides.pop("momentum", cfg.momentum)
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, **overrides)
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")

    return factory


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
        if cfg.deterministic:
            deterministic_attention(device)
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
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, cosine_lr_lambda(cfg, self.steps_per_epoch)
            )
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

    def loop_state(self) -> dict[str, Any]:
        """The counters a resumed run needs (saved in epoch checkpoints, :mod:`mmbalance.checkpoint`)."""
        return {"global_step": self.global_step, "start_loss": self._start_loss}

    def load_loop_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`loop_state`."""
        self.global_step = int(state["global_step"])
        self._start_loss = state["start_loss"]

    # The hot path. No .item(), no host reads.
    def train_step(self, batch: Mapping[str, Tensor], epoch: int, step_in_epoch: int) -> None:
        model, balancer, opt, scaler = self.model, self.balancer, self.optimizer, self.scaler
        with autocast(self.cfg, self.device):
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
        rows = torch.stack([torch.stack([t.float().reshape(()) for t in row]) for row in self._term_rows])
        rows = rows.double().cpu()
        self._term_rows = []
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            bad_row, bad_col = (~finite).nonzero()[0].tolist()
            name = self._term_names[bad_col]
            raise NonFiniteLossError(
                f"loss term {name!r} is {rows[bad_row, bad_col].item()} at step "
                f"{self._buf_first_step + bad_row} (epoch {self._epoch}); terms at that step: "
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
    resumed_from_epoch: int | None = None  # the first epoch trained by this call, when it resumed


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
    checkpoint: RunCheckpoint | None = None,
) -> FitResult:
    """Train with validation every epoch, keep the best-validation state, test it once.

    ``splits`` maps "train", "val", "test" to datasets. The first training batch is checked
    against ``spec`` (ShapeError on a mismatch). Test data is read exactly once, at the end. With a
    ``checkpoint``, training continues from its last epoch when it holds one, and epoch
    checkpoints are written as it says (:mod:`mmbalance.checkpoint`). ``on_epoch_end(record)`` is
    called after each epoch, and at a resume for each restored epoch first.
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
    steps_per_epoch = len(train_loader)
    if cfg.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    trainer = Trainer(model, balancer, task, cfg, device, steps_per_epoch)
    scores = cfg.eval_modality_scores
    state = (checkpoint.restore(trainer, train_loader) if checkpoint is not None else None) or FitProgress()
    for record in state.history if on_epoch_end is not None else ():  # the restored epochs
        on_epoch_end(record)
    t_start = time.perf_counter()
    progress = tqdm(total=cfg.epochs * steps_per_epoch, initial=state.next_epoch * steps_per_epoch,
                    disable=quiet, desc=f"{balancer.name}", leave=False)
    for epoch in range(state.next_epoch, cfg.epochs):
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
        val = evaluate(trainer.model, balancer, val_loader, task, device, cfg, modality_scores=scores)
        if cfg.scheduler == "plateau":
            trainer.scheduler.step(val["loss"])
        balancer.on_validation_end(epoch, val)
        record.update(epoch=epoch, val=val, diagnostics=balancer.diagnostics())
        state.history.append(record)
        if is_better(task, val, state.best_val):
            state.best_val, state.best_epoch = val, epoch
            state.best_state = {"model": snapshot(trainer.model), "balancer": snapshot(balancer)}
        if on_epoch_end is not None:
            on_epoch_end(record)
        state.next_epoch = epoch + 1
        elapsed = state.train_time_s + time.perf_counter() - t_start
        if checkpoint is not None and checkpoint.due(epoch, cfg.epochs, elapsed):
            checkpoint.save(trainer, train_loader, state, elapsed)
        progress.set_postfix(loss=f"{record['train_loss']:.4f}", val=f"{val[task.primary_metric]:.4f}")
    progress.close()
    train_time = state.train_time_s + time.perf_counter() - t_start
    best_state, best_val = state.best_state, state.best_val
    assert best_state is not None and best_val is not None
    restore(trainer.model, best_state["model"])
    restore(balancer, best_state["balancer"])
    test_loader = make_loader(splits["test"], cfg, device, train=False)
    test = evaluate(trainer.model, balancer, test_loader, task, device, cfg, modality_scores=scores)
    return FitResult(
        val=best_val,
        test=test,
        best_epoch=state.best_epoch,
        history=state.history,
        train_time_s=train_time,
        steps=trainer.global_step,
        best_state=best_state,
        trainer=trainer,
        resumed_from_epoch=state.resumed_from_epoch,
    )

