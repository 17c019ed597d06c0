"""Epoch checkpoints: a killed, preempted or retried run continues where it stopped, not from zero.

What is saved, at the end of an epoch (after validation, ``on_validation_end``, ``diagnostics`` and
the best-state update): the model's trainable state (frozen parameters are rebuilt identically from
the run's seed or local weights), the main optimizer, the LR scheduler, the GradScaler, the
balancer's :meth:`~mmbalance.balancer.Balancer.training_state` (its modules and buffers, every own
optimizer, its host state), the loop's counters (global step, the divergence bound), every random
state (Python, NumPy, torch CPU, the run device's CUDA generator, and the training loader's
generator, so the next epoch's shuffling is the one an uninterrupted run draws), the history, the
best-validation metrics, epoch and state, and the training time so far.

Where: ``<out>/_ckpt/<run_id>/checkpoint.pt``, written atomically (a temporary file in that folder,
fsync, ``os.replace``): a kill leaves the previous checkpoint or the new one, never half of one. It
holds tensors and plain values only, and is read with ``torch.load(weights_only=True)``.

When (``checkpoint_every``): ``N`` writes one after every N-th epoch and after the last one (a kill
during the final test or the cost measurement then skips training); ``0`` never; ``"auto"``
(default) after every epoch once the run is *expected to take at least* :data:`AUTO_MIN_SECONDS`:
after each epoch, the training time so far divided by the finished epochs, times the run's epochs.
A run expected under a minute is cheaper to redo than to checkpoint; the paper's CUDA runs (minutes
per epoch) pass the bar at their first epoch, so ``auto`` is every epoch there.

A run that finds a checkpoint continues from the epoch after it; on CPU with the same thread count
its row equals an uninterrupted run's except for the fields of :data:`TIMING_FIELDS` (wall-clock
measurements, which differ between any two runs; ``train_time_s`` is the sum over the attempts) and
of :data:`EXECUTION_FIELDS` (how it was carried out: ``resumed_from_epoch``, ``takeover``,
``attempts``, the node, the process, the Ray task and how the thread count was chosen). The matrix
removes the folder once the run's ``ok`` or ``diverged`` row is written (``--keep-checkpoints`` keeps
it); a failed run keeps its checkpoint, so its retry resumes too.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mmbalance.errors import ConfigError, OutputError, ResultError
from mmbalance.evaluation import restore, snapshot
from mmbalance.output import output_error, remove_stale_temps, temp_path

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from mmbalance.train import Trainer

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "AUTO_MIN_SECONDS",
    "TIMING_FIELDS",
    "EXECUTION_FIELDS",
    "CheckpointEvery",
    "FitProgress",
    "RunCheckpoint",
    "parse_checkpoint_every",
    "comparable_row",
]

CHECKPOINT_DIR = "_ckpt"  # sub-folder of a results folder: one folder per run being trained
CHECKPOINT_FILE = "checkpoint.pt"
AUTO_MIN_SECONDS = 60.0  # "auto" checkpoints runs expected to train at least this long
FORMAT = 1
# Row fields that are wall-clock measurements: they differ between any two runs of the same config.
TIMING_FIELDS: Mapping[str, tuple[str, ...]] = {
    "cost": ("step_ms_median", "step_ms_iqr", "joint_step_ms_median", "joint_step_ms_iqr",
             "step_time_ratio", "train_time_s", "loader_wait_s"),
    "history": ("epoch_time_s", "loader_wait_s"),
}
# Row fields that record how a run was carried out, not what it computed.
EXECUTION_FIELDS: Mapping[str, tuple[str, ...]] = {
    "": ("resumed_from_epoch", "takeover", "attempts"),
    # threads_rule records how the count was chosen (--threads auto here, --cpus-per-run on Ray);
    # the count itself (env.threads) is compared
    "env": ("node", "pid", "ray_task_id", "ray_gpu_ids", "threads_rule"),
}

CheckpointEvery = int | Literal["auto"]


def parse_checkpoint_every(text: str | int) -> CheckpointEvery:
    """``"auto"`` or an integer >= 0 (``--checkpoint-every``).

    Raises:
        ConfigError: naming ``--checkpoint-every``, the value and the expected forms.
    """
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = -1
    if isinstance(text, bool) or value < 0 or str(value) != str(text).strip():
        raise ConfigError(
            f"--checkpoint-every must be 'auto' or an integer >= 0 (epochs; 0 = never), got {text!r}"
        )
    return value


def comparable_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` without :data:`TIMING_FIELDS` and :data:`EXECUTION_FIELDS`: what two runs of one
    config on CPU with one thread count must agree on, however they were interrupted."""
    out = {k: v for k, v in row.items() if k not in EXECUTION_FIELDS[""]}
    out["env"] = {k: v for k, v in row.get("env", {}).items() if k not in EXECUTION_FIELDS["env"]}
    out["cost"] = {k: v for k, v in row.get("cost", {}).items() if k not in TIMING_FIELDS["cost"]}
    out["history"] = [
        {k: v for k, v in record.items() if k not in TIMING_FIELDS["history"]}
        for record in row.get("history", [])
    ]
    return out


@dataclass
class FitProgress:
    """The state :func:`mmbalance.train.fit` carries from epoch to epoch (saved in a checkpoint)."""

    next_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: dict[str, float] | None = None
    best_epoch: int = -1
    best_state: dict[str, Any] | None = None
    train_time_s: float = 0.0  # training time of earlier attempts (a resumed run adds its own)
    resumed_from_epoch: int | None = None  # the first epoch this attempt trained, when it resumed


# -- random states -----------------------------------------------------------------------------
def _rng_state(device: torch.device, loader: DataLoader) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "loader": loader.generator.get_state() if loader.generator is not None else None,
    }
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device, loader: DataLoader) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        if device.type != "cuda":
            raise ConfigError(f"the checkpoint was made on CUDA, this run trains on {device}")
        torch.cuda.set_rng_state(state["cuda"], device)
    if state["loader"] is not None:
        loader.generator.set_state(state["loader"])


# -- the checkpoint of one run -----------------------------------------------------------------
@dataclass(frozen=True)
class RunCheckpoint:
    """The checkpoint folder of run ``run_id`` and when to write it (see the module docstring)."""

    folder: Path
    run_id: str
    every: CheckpointEvery = "auto"
    keep: bool = False  # kept once the run's row is written (``--keep-checkpoints``)

    @classmethod
    def in_results(cls, out: str | os.PathLike[str], run_id: str, every: CheckpointEvery,
                   keep: bool = False) -> RunCheckpoint:
        """``<out>/_ckpt/<run_id>`` (an absolute path: it may travel to another process)."""
        return cls(Path(out).absolute() / CHECKPOINT_DIR / run_id, run_id, every, keep)

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def due(self, epoch: int, epochs: int, train_time_s: float) -> bool:
        """Whether to write a checkpoint after ``epoch`` (0-based) of ``epochs``."""
        if self.every == "auto":
            return train_time_s / (epoch + 1) * epochs >= AUTO_MIN_SECONDS
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == epochs)

    def save(self, trainer: Trainer, loader: DataLoader, progress: FitProgress, train_time_s: float) -> None:
        """Write the state after epoch ``progress.next_epoch - 1`` atomically.

        Raises:
            OutputError: the folder or the file cannot be written (naming the path and errno).
        """
        state = {
            "format": FORMAT,
            "run_id": self.run_id,
            "epoch": progress.next_epoch - 1,
            "model": snapshot(trainer.model),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "scaler": trainer.scaler.state_dict(),
            "balancer": trainer.balancer.training_state(),
            "loop": trainer.loop_state(),
            "rng": _rng_state(trainer.device, loader),
            "history": progress.history,
            "best": {"val": progress.best_val, "epoch": progress.best_epoch, "state": progress.best_state},
            "train_time_s": train_time_s,
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.folder, exc, "cannot create checkpoint folder") from exc
        tmp = temp_path(self.path)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise output_error(self.path, exc, "cannot write checkpoint") from exc
            raise

    def restore(self, trainer: Trainer, loader: DataLoader) -> FitProgress | None:
        """Load the checkpoint into a freshly built ``trainer`` (after its setup) and ``loader`` (after
        the first-batch check); None when there is none.

        Raises:
            ResultError: the file cannot be read, or holds another run's checkpoint (naming the path
                and how to start over).
        """
        remove_stale_temps(self.folder)
        if not self.path.is_file():
            return None
        start_over = f"remove the folder {str(self.folder)!r} to train run {self.run_id} from its first epoch"
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file (truncated, foreign, wrong torch) gets one message
            raise ResultError(f"checkpoint {str(self.path)!r} cannot be read ({exc}); {start_over}") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("run_id") != self.run_id:
            found = state.get("run_id") if isinstance(state, dict) else type(state).__name__
            raise ResultError(
                f"checkpoint {str(self.path)!r} is not a format-{FORMAT} checkpoint of run {self.run_id} "
                f"(found {found!r}); {start_over}"
            )
        restore(trainer.model, state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.balancer.load_training_state(state["balancer"])
        trainer.load_loop_state(state["loop"])
        _set_rng_state(state["rng"], trainer.device, loader)
        best = state["best"]
        epoch = int(state["epoch"])
        return FitProgress(
            next_epoch=epoch + 1, history=list(state["history"]), best_val=best["val"],
            best_epoch=int(best["epoch"]), best_state=best["state"],
            train_time_s=float(state["train_time_s"]), resumed_from_epoch=epoch + 1,
        )

    def remove(self) -> None:
        """Delete the run's checkpoint folder (after its row is written)."""
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with contextlib.suppress(FileNotFoundError, OSError):
                self.folder.rmdir()
