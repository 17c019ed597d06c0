"""Where a run executes: device choice, seeding and determinism, data loaders, batch transfer, autocast.

Used by the loop (:mod:`mmbalance.train`), evaluation (:mod:`mmbalance.evaluation`), the runner and
the benchmarks, so that every path picks devices, seeds and batches the same way.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmbalance.datasets.base import TensorDictDataset, identity_collate
from mmbalance.errors import ConfigError

if TYPE_CHECKING:
    from mmbalance.train import TrainConfig

__all__ = [
    "resolve_device",
    "check_device_name",
    "seed_everything",
    "deterministic_attention",
    "make_loader",
    "batch_to_device",
    "autocast",
]


def check_device_name(device: str | torch.device) -> None:
    """Raise ConfigError unless ``device`` reads ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether that
    device exists here is :func:`resolve_device`'s business)."""
    if isinstance(device, torch.device):
        return
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises ConfigError for CUDA without a GPU."""
    check_device_name(device)
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def deterministic_attention(device: torch.device) -> None:
    """On CUDA, route ``scaled_dot_product_attention`` (every ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` here) to its math kernel, for the rest of the process.

    Under ``use_deterministic_algorithms(True, warn_only=True)`` the fused kernels (flash,
    memory-efficient, cuDNN) keep a non-deterministic backward and only warn, so a seeded CUDA run of
    a transformer would not repeat itself; the math kernel's backward is deterministic. Called by
    :class:`~mmbalance.train.Trainer` for a deterministic run on CUDA. A no-op off CUDA (the flags are
    process-wide and would change the CPU kernels too).
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)


def _set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` without its import of
    ``torch._inductor.config`` (about 5 s on a 2-core machine, paid by every run process) unless
    inductor is already loaded; mmbalance does not compile, so only the ATen flag matters."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=True)


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
    """Every tensor of ``batch`` on ``device`` (non-blocking on CUDA, where loaders pin memory)."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def autocast(cfg: TrainConfig, device: torch.device) -> AbstractContextManager[Any]:
    """The run's autocast context: bf16 / fp16 on CUDA when ``cfg.amp`` asks, else a no-op."""
    if cfg.amp == "none" or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
