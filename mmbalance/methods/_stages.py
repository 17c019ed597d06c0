"""Extra training stages and held-out statistics for multi-stage methods (G-Blending, UMT, MSLR, MSES).

These methods do epoch-level work inside ``on_train_epoch_start``: short trainings of model copies
(G-Blending), unimodal teacher training (UMT), unimodal validation passes (MSLR, MSES). That work
must not perturb the main run, so that a neutral setting reproduces ``joint`` exactly:

* it runs under :func:`isolated_rng` (``torch.random.fork_rng``): dropout masks and the seeds drawn
  by DataLoader iterators inside a stage do not advance the main loop's random stream;
* it reads data through :func:`stage_loader`, a private DataLoader over the same dataset with its
  own seeded generator, so the main training loader's shuffling order is untouched.

Only the training and validation loaders of :class:`~mmbalance.balancer.EpochContext` are used;
test data never reaches a method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmbalance.errors import ConfigError
from mmbalance.methods._precision import upcast
from mmbalance.models.base import MultimodalModel

__all__ = [
    "isolated_rng",
    "stage_loader",
    "stage_seed",
    "eval_mode",
    "encode_modality",
    "target_size",
    "iterate",
    "train_pass",
    "mean_loss",
    "unimodal_validation",
]


def isolated_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the global CPU (and CUDA, on a CUDA device) RNG; the state is restored on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def stage_seed(*parts: int) -> int:
    """A seed for a stage's private generator, from the run's seed (``torch.initial_seed()``, read
    without consuming the RNG) and the stage's identity (epoch, candidate index, ...)."""
    seed = torch.initial_seed()
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63)
    return seed


def stage_loader(loader: DataLoader, *, shuffle: bool, seed: int) -> DataLoader:
    """A private DataLoader over ``loader.dataset`` with the same batch size and collate function and
    its own seeded generator (never drops the last batch).

    Raises:
        ConfigError: ``loader`` has no fixed ``batch_size`` (a custom batch sampler).
    """
    if loader.batch_size is None:
        raise ConfigError("stage loaders need a DataLoader with a fixed batch_size, got batch_size=None")
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=loader.collate_fn,
        drop_last=False,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore each one's previous ``training`` flags on exit."""
    saved = [[(m, m.training) for m in module.modules()] for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for flags in saved:
            for m, training in flags:
                m.training = training


def encode_modality(model: MultimodalModel, modality: str, batch: Mapping[str, Tensor]) -> Tensor:
    """``features[modality]`` computed by that encoder alone (the other encoders do not run)."""
    out = model.encoders[modality](batch[modality])
    return out[0] if isinstance(out, tuple) else out


def target_size(batch: Mapping[str, Tensor]) -> tuple[int, int] | None:
    """The target's ``(H, W)`` for segmentation label maps ``(B, H, W)``; ``None`` otherwise."""
    target = batch["target"]
    return (int(target.shape[-2]), int(target.shape[-1])) if target.dim() == 3 else None


def iterate(
    loader: DataLoader,
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    max_batches: int | None,
) -> Iterator[dict[str, Tensor]]:
    """Batches of ``loader`` on the device, at most ``max_batches`` of them (``None`` = all)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield to_device(batch)


def train_pass(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    max_batches: int | None = None,
) -> int:
    """One training pass of a stage: for each batch (at most ``max_batches``), zero the gradients,
    back-propagate ``loss_fn(batch)`` (a 0-d loss) and step ``optimizer``. Returns the number of steps
    (for :meth:`~mmbalance.balancer.Balancer.extra_steps`)."""
    steps = 0
    for batch in iterate(loader, to_device, max_batches):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        optimizer.step()
        steps += 1
    return steps


@torch.no_grad()
def mean_loss(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    loader: DataLoader,
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    max_batches: int | None = None,
) -> float:
    """Per-sample mean of ``loss_fn(batch)`` (a mean-reduced 0-d loss) over the loader; one host sync.

    Raises:
        ConfigError: the loader yields no batch.
    """
    total: Tensor | None = None
    count = 0
    for batch in iterate(loader, to_device, max_batches):
        size = int(batch["target"].shape[0])
        value = loss_fn(batch).detach().double() * size
        total = value if total is None else total + value
        count += size
    if total is None:
        raise ConfigError("loss estimation loader is empty; expected at least one batch")
    return float(total) / count


@torch.no_grad()
def unimodal_validation(
    model: MultimodalModel,
    heads: nn.Module,
    loader: DataLoader,
    task: Any,
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    modalities: Sequence[str],
    max_batches: int | None = None,
) -> dict[str, tuple[float, float]]:
    """``{m: (mean loss, mean score)}`` of the unimodal heads over ``loader`` (model and heads in eval
    mode, restored afterwards). Scores use ``task.score`` (accuracy, sign accuracy, mean Dice), batch
    means weighted by batch size. One host sync.

    Raises:
        ConfigError: the loader yields no batch.
    """
    acc: Tensor | None = None
    count = 0
    with eval_mode(model, heads):
        for batch in iterate(loader, to_device, max_batches):
            features, _ = model.encode(batch)
            predictions = heads(features, target_size(batch))
            size = int(batch["target"].shape[0])
            target = batch["target"]
            rows = []
            for m in modalities:
                prediction = upcast(predictions[m])
                rows.append(torch.stack([task.loss(prediction, target), task.score(prediction, target)]))
            row = torch.stack(rows).double() * size
            acc = row if acc is None else acc + row
            count += size
    if acc is None:
        raise ConfigError("validation loader is empty; expected at least one batch")
    sums = (acc / count).cpu()
    return {m: (float(sums[i, 0]), float(sums[i, 1])) for i, m in enumerate(modalities)}
