"""Is the imbalance real? Linear probes on frozen encoders after joint vs. unimodal training.

The claim the balancing methods rest on: joint training under-uses the weak modality, so its
encoder ends up worse than the same encoder trained alone. For one dataset and seed,
:func:`imbalance_experiment` measures, for the dataset's weak modality ``w``
(``spec.notes["weak_modality"]`` of the synthetic datasets, or any modality you name):

* ``unimodal``: the test metric of the model trained with the ``unimodal`` balancer on ``w`` alone
  (the other modalities' features are zeroed, end to end, same architecture and initialisation);
* ``probe_joint``: a linear probe trained on ``w``'s *frozen* encoder features after ``joint``
  training (best-validation weights);
* two controls, so the gap cannot be an artefact of comparing a probe with a full head:
  ``probe_unimodal`` (the same probe on ``w``'s encoder after unimodal training) and
  ``probe_random`` (the same probe on the shared random initialisation);
* ``joint``: the fused model's own test metric.

All three models start from the same initial weights (``seed_everything(seed)`` before each build)
and train under the dataset's training preset (``spec.default_preset``, e.g. ``synthetic``) with
``TrainConfig.seed = seed``; the dataset itself is drawn with ``dataset.seed = seed`` so that the
seeds also vary the data. The probe is linear in the features: ``Linear(d, C)`` on vectors, the
time mean followed by ``Linear`` on sequences (cls / reg), and a 1x1 ``Conv2d`` followed by a fixed
bilinear upsampling to the label size on feature maps (seg). It is trained with the task loss on
features computed once, selected on the validation split, and read once on test.

``gap`` (the table's headline) is ``unimodal - probe_joint`` oriented so that positive means the
encoder trained alone is better (for MAE: ``probe_joint - unimodal``).

Run ``python -m mmbalance.analysis.probe --seeds 0 1 2 --out results/imbalance`` to regenerate the
committed table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.models.base import MultimodalModel
from mmbalance.models.resize import resize_bilinear
from mmbalance.presets import TRAIN_PRESETS
from mmbalance.tasks import METRIC_HIGHER_IS_BETTER, Task, make_task
from mmbalance.train import TrainConfig, fit, is_better, make_loader, resolve_device, seed_everything

__all__ = [
    "ProbeConfig",
    "ProbeResult",
    "LinearProbe",
    "extract_features",
    "train_probe",
    "probe_encoder",
    "imbalance_experiment",
    "imbalance_table",
    "format_table",
    "main",
]

SYNTHETIC_DATASETS = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")
PROBES = ("probe_joint", "probe_unimodal", "probe_random")


@dataclass(frozen=True)
class ProbeConfig:
    """Training of the linear probe on cached features."""

    epochs: int = 40  # passes over the cached training features
    lr: float = 1e-2  # Adam learning rate (a linear model on fixed features converges fast)
    batch_size: int = 256  # probe mini-batch size
    weight_decay: float = 0.0  # L2 penalty of Adam

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class ProbeResult:
    """Metrics of the probe at its best-validation epoch."""

    val: dict[str, float]
    test: dict[str, float]
    best_epoch: int


class LinearProbe(nn.Module):
    """A read-out that is linear in the frozen features.

    Args:
        feature_shape: per-sample feature shape: ``(d,)``, ``(L, d)`` (time-averaged) or
            ``(c, h, w)`` (1x1 conv, then bilinear upsampling of the logits to ``target_shape``).
        num_outputs: classes (cls, seg) or 1 (reg).
        target_shape: per-sample target shape; ``(H, W)`` for feature maps.
    """

    def __init__(
        self, feature_shape: Sequence[int], num_outputs: int, target_shape: Sequence[int] = ()
    ) -> None:
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        if len(self.feature_shape) in (1, 2):
            self.read = nn.Linear(self.feature_shape[-1], num_outputs)
            self.size: tuple[int, int] | None = None
        elif len(self.feature_shape) == 3:
            if len(target_shape) != 2:
                raise ShapeError(
                    f"a feature-map probe needs a (H, W) target_shape, got {tuple(target_shape)}"
                )
            self.read = nn.Conv2d(self.feature_shape[0], num_outputs, 1)
            self.size = (int(target_shape[0]), int(target_shape[1]))
        else:
            raise ShapeError(f"feature_shape must be (d,), (L, d) or (c, h, w), got {self.feature_shape}")

    def forward(self, features: Tensor) -> Tensor:
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ShapeError(
                f"probe input has per-sample shape {tuple(features.shape[1:])}, expected {self.feature_shape}"
            )
        if len(self.feature_shape) == 2:
            features = features.mean(dim=1)
        out = self.read(features)
        if self.size is not None and tuple(out.shape[-2:]) != self.size:
            out = resize_bilinear(out, self.size, align_corners=False)
        return out


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Dataset, modality: str, device: torch.device, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``(features, targets)`` of a whole split, encoder in eval mode, on ``device``."""
    was_training = encoder.training
    encoder.eval()
    loader = make_loader(dataset, TrainConfig(batch_size=batch_size), device, train=False)
    feats, targets = [], []
    for batch in loader:
        if modality not in batch:
            raise ShapeError(f"batch has no modality {modality!r}; keys: {sorted(batch)}")
        out = encoder(batch[modality].to(device))
        if isinstance(out, tuple):  # encoders may return (feature, extras)
            out = out[0]
        feats.append(out.float())
        targets.append(batch["target"].to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(targets)


def _evaluate_probe(
    probe: LinearProbe, features: Tensor, targets: Tensor, task: Task, batch_size: int
) -> dict[str, float]:
    suite = task.metrics()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            suite.update(probe(features[start : start + batch_size]), targets[start : start + batch_size])
    return dict(suite.compute())


def train_probe(
    features: Mapping[str, tuple[Tensor, Tensor]],
    task: Task,
    target_shape: Sequence[int],
    cfg: ProbeConfig,
    *,
    seed: int = 0,
) -> ProbeResult:
    """Fit a :class:`LinearProbe` on ``features["train"]``, select on ``"val"``, read ``"test"``.

    Args:
        features: ``{"train" | "val" | "test": (features (N, ...), targets (N, ...))}`` on one device.
        task: supplies the loss, the metric suite and the primary metric for selection.
        target_shape: per-sample target shape (``(H, W)`` for segmentation).
        cfg: probe optimisation settings.
        seed: seeds the probe's initialisation and the mini-batch order.
    """
    for s in ("train", "val", "test"):
        if s not in features:
            raise ConfigError(f"features must contain 'train', 'val' and 'test', missing {s!r}")
    x_train, y_train = features["train"]
    device = x_train.device
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(x_train.shape[1:], task.num_outputs, target_shape).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_val: dict[str, float] | None = None
    best_state: dict[str, Tensor] = {}
    best_epoch = -1
    n = len(x_train)
    for epoch in range(cfg.epochs):
        probe.train()
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = task.loss(probe(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        probe.eval()
        val = _evaluate_probe(probe, *features["val"], task, cfg.batch_size)
        if is_better(task, val, best_val):
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    assert best_val is not None
    probe.load_state_dict(best_state)
    probe.eval()
    test = _evaluate_probe(probe, *features["test"], task, cfg.batch_size)
    return ProbeResult(val=best_val, test=test, best_epoch=best_epoch)


def probe_encoder(
    model: MultimodalModel,
    modality: str,
    splits: Mapping[str, Dataset],
    spec: DatasetSpec,
    task: Task,
    cfg: ProbeConfig,
    device: torch.device,
    *,
    seed: int = 0,
) -> ProbeResult:
    """Linear probe on the frozen encoder ``model.encoders[modality]`` (features computed once)."""
    if modality not in model.modalities:
        raise ConfigError(f"modality must be one of {model.modalities}, got {modality!r}")
    encoder = model.encoders[modality].to(device)
    features = {
        s: extract_features(encoder, splits[s], modality, device, cfg.batch_size)
        for s in ("train", "val", "test")
    }
    return train_probe(features, task, spec.target_shape, cfg, seed=seed)


def _train_config(spec: DatasetSpec, seed: int, overrides: Mapping[str, Any]) -> TrainConfig:
    values: dict[str, Any] = dict(TRAIN_PRESETS.get(spec.default_preset or "", {}))
    values.update(seed=seed, cost_steps=0)
    values.update(overrides)
    unknown = sorted(set(values) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown TrainConfig keys {unknown}; valid: {sorted(TrainConfig.__dataclass_fields__)}"
        )
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        raise ConfigError(f"invalid training config: {exc}") from exc


def imbalance_experiment(
    dataset: str,
    seed: int,
    *,
    modality: str | None = None,
    model: str | None = None,
    dataset_overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    probe: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """One (dataset, seed) cell: joint, unimodal and random-init encoders of ``modality``, probed.

    Returns a JSON-able dict with the dataset, seed, modality, metric name and direction, the
    values ``unimodal``, ``probe_joint``, ``probe_unimodal``, ``probe_random``, ``joint`` (test,
    the primary metric), ``gap`` (positive = encoder trained alone is better), the joint model's
    validation ``score/<modality>``, the resolved configs and the wall time.
    """
    dev = resolve_device(device)
    probe_cfg = probe or ProbeConfig()
    ds = DATASETS.build(dataset, None, **{"seed": seed, **dict(dataset_overrides or {})})
    spec = ds.spec
    if modality is None:
        modality = spec.notes.get("weak_modality")
        if modality is None:
            raise ConfigError(
                f"dataset {dataset!r} declares no weak modality (spec.notes['weak_modality']); pass modality="
            )
    if modality not in spec.modalities:
        raise ConfigError(f"modality must be one of {spec.modality_names}, got {modality!r}")
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    cfg = _train_config(spec, seed, train_overrides or {})
    model_name = model or spec.default_model
    builder = MODELS.build(model_name, None, **dict(model_overrides or {}))

    def fresh_model() -> MultimodalModel:
        seed_everything(seed, cfg.deterministic)
        return builder(spec)

    t0 = time.perf_counter()
    joint_model = fresh_model()
    joint_fit = fit(joint_model, METHODS.build("joint"), splits, spec, task, cfg, dev)
    uni_model = fresh_model()
    uni_fit = fit(uni_model, METHODS.build("unimodal", None, modality=modality), splits, spec, task, cfg, dev)
    random_model = fresh_model().to(dev)
    test: dict[str, dict[str, float]] = {"unimodal": uni_fit.test, "joint": joint_fit.test}
    for name, trained in (
        ("probe_joint", joint_model),
        ("probe_unimodal", uni_model),
        ("probe_random", random_model),
    ):
        test[name] = probe_encoder(trained, modality, splits, spec, task, probe_cfg, dev, seed=seed).test
    return {
        "dataset": dataset,
        "seed": seed,
        "task": spec.task,
        "modality": modality,
        "primary_metric": task.primary_metric,
        "test": {variant: {k: float(v) for k, v in values.items()} for variant, values in test.items()},
        "joint_val_modality_score": joint_fit.val.get(f"score/{modality}", math.nan),
        "best_epochs": {"joint": joint_fit.best_epoch, "unimodal": uni_fit.best_epoch},
        "config": {
            "model": model_name,
            "model_overrides": dict(model_overrides or {}),
            "dataset": dict(vars(ds.config)),
            "train": asdict(cfg),
            "probe": asdict(probe_cfg),
        },
        "wall_s": time.perf_counter() - t0,
    }


def gap(row: Mapping[str, Any], metric: str) -> float:
    """``unimodal - probe_joint`` for ``metric``, signed so that positive = trained alone is better."""
    alone, probed = row["test"]["unimodal"][metric], row["test"]["probe_joint"][metric]
    return alone - probed if METRIC_HIGHER_IS_BETTER[metric] else probed - alone


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


# Metrics shown per task. Regression adds Pearson r: a weak modality that explains only part of the
# target (audio explains w_b * b of y) has an MAE dominated by the part it cannot explain, so MAE
# alone compresses every variant into a narrow band; r is scale-free and shows what was learned.
TABLE_METRICS: Mapping[str, tuple[str, ...]] = {
    "cls": ("acc",),
    "reg": ("corr", "mae"),
    "seg": ("dice_mean",),
}
VARIANTS = (
    ("unimodal", "trained alone"),
    ("probe_joint", "probe, joint encoder"),
    ("gap", "gap (alone − joint probe)"),
    ("probe_unimodal", "probe, unimodal encoder"),
    ("probe_random", "probe, random encoder"),
    ("joint", "joint fused"),
)


def format_table(
    rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Sequence[str]] | None = None
) -> str:
    """Markdown table, one line per (dataset, metric); cells ``mean ± std`` (sample std) over seeds."""
    metrics = TABLE_METRICS if metrics is None else metrics
    lines = [
        "| dataset | weak modality | metric | n | " + " | ".join(title for _, title in VARIANTS) + " |",
        "|---|---|---|---|" + "---|" * len(VARIANTS),
    ]
    order: list[tuple[str, str]] = []
    for r in rows:
        if (r["dataset"], r["modality"]) not in order:
            order.append((r["dataset"], r["modality"]))
    for dataset, modality in order:
        group = [r for r in rows if r["dataset"] == dataset and r["modality"] == modality]
        for metric in metrics.get(group[0]["task"], (group[0]["primary_metric"],)):
            arrow = "↑" if METRIC_HIGHER_IS_BETTER[metric] else "↓"
            cells = []
            for variant, _ in VARIANTS:
                values = [gap(r, metric) if variant == "gap" else r["test"][variant][metric] for r in group]
                mean, std = _mean_std(values)
                cells.append(f"{mean:.3f} ± {std:.3f}")
            lines.append(
                f"| {dataset} | {modality} | {metric} {arrow} | {len(group)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def imbalance_table(
    datasets: Sequence[str] = SYNTHETIC_DATASETS,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    progress: bool = False,
    **experiment_kwargs: Any,
) -> tuple[list[dict[str, Any]], str]:
    """Run :func:`imbalance_experiment` for every dataset x seed; return ``(rows, markdown)``."""
    if not datasets:
        raise ConfigError("datasets must name at least one dataset, got none")
    if not seeds:
        raise ConfigError("seeds must list at least one seed, got none")
    rows = []
    for dataset in datasets:
        for seed in seeds:
            row = imbalance_experiment(dataset, int(seed), **experiment_kwargs)
            rows.append(row)
            if progress:
                key = row["primary_metric"]
                print(
                    f"{dataset} seed {seed}: {key} alone {row['test']['unimodal'][key]:.3f}, joint probe "
                    f"{row['test']['probe_joint'][key]:.3f}, gap {gap(row, key):+.3f} ({row['wall_s']:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows, format_table(rows)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmbalance.analysis.probe [--datasets ...] [--seeds ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mmbalance.analysis.probe",
        description="Weak-modality encoder trained alone vs. a linear probe on it after joint training.",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(SYNTHETIC_DATASETS), help="registered dataset names"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="data and training seeds")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write README.md and rows.json to this folder")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    rows, table = imbalance_table(args.datasets, args.seeds, device=device, progress=True)
    elapsed = time.perf_counter() - t0
    print(table)
    if args.out is not None:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        command = "python -m mmbalance.analysis.probe " + " ".join(argv_list)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        (args.out / "README.md").write_text(
            _readme(table, command.strip(), _device_name(device), elapsed, args.seeds)
        )
    return 0


def _readme(table: str, command: str, device: str, elapsed: float, seeds: Sequence[int]) -> str:
    return f"""# The planted imbalance is real: weak-modality encoder, alone vs. after joint training

Produced by (from the repository root, torch {torch.__version__}, device: {device}, {elapsed:.0f} s):

```
PYTHONPATH=. {command}
```

For each synthetic dataset, its weak modality (`spec.notes["weak_modality"]`) and seeds
{", ".join(str(s) for s in seeds)} (each seed draws the data, the initial weights and the batch order), on the
test split at the best-validation epoch:

- **trained alone**: the `unimodal` method on the weak modality (same architecture, the other
  modalities' features zeroed), end to end;
- **probe, joint encoder**: a linear probe (1x1 conv + bilinear upsampling for segmentation) trained
  on the weak modality's frozen encoder features after `joint` training;
- **gap**: trained alone minus joint probe, oriented so that positive means joint training left the
  weak encoder worse (for MAE, the sign is flipped);
- controls: the same probe on the encoder after unimodal training, and on the shared random
  initialisation; **joint fused**: the joint model's own metric with every modality.

Cells are mean ± sample std over the seeds. Training: the datasets' `synthetic` preset
(`mmbalance/presets.py`), models `small_*` (`mmbalance/models/small.py`). Per-seed rows with the
resolved configs: `rows.json`. Method: `mmbalance/analysis/probe.py`; data: `mmbalance/datasets/synthetic.py`.

{table}
"""


if __name__ == "__main__":
    raise SystemExit(main())
