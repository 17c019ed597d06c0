"""Parity of ``joint`` through mmbalance with a hand-written plain PyTorch loop.

Like Lightning's parity tests: the same model, data, seed and optimizer, stepped (a) by
:class:`mmbalance.train.Trainer` with the ``joint`` balancer and (b) by the five lines every
PyTorch user writes. The weights must be identical after N steps on CPU, and the step-time ratio
(median over interleaved steps) is the runner's own overhead.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mmbalance.datasets import DATASETS
from mmbalance.methods.joint import Joint
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader, seed_everything

__all__ = ["BareLoop", "parity_setup", "measure_parity"]


class BareLoop:
    """The plain loop: forward, loss, backward, step, zero_grad. Nothing else."""

    def __init__(self, model: torch.nn.Module, loss_fn: Any, lr: float) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def train_step(self, batch: Mapping[str, Tensor], epoch: int = 0, step: int = 0) -> None:
        prediction = self.model(batch).prediction
        loss = self.loss_fn(prediction, batch["target"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def parity_setup(
    dataset: str = "synthetic_cls3", batch_size: int = 64, n_batches: int = 8, seed: int = 0
) -> tuple[Trainer, BareLoop, list[dict[str, Tensor]]]:
    """A joint Trainer and a BareLoop on identical copies of the dataset's default model."""
    device = torch.device("cpu")
    ds = DATASETS.build(dataset)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    cfg = TrainConfig(batch_size=batch_size, seed=seed, optimizer="adam", lr=1e-3, eval_modality_scores=False)
    seed_everything(seed)
    model = MODELS.build(spec.default_model)(spec)
    bare_model = copy.deepcopy(model)
    loader = make_loader(ds.split("train"), cfg, device, train=True)
    batches = []
    for b in loader:
        batches.append(batch_to_device(b, device))
        if len(batches) == n_batches:
            break
    trainer = Trainer(model, Joint(), task, cfg, device, len(loader))
    return trainer, BareLoop(bare_model, task.loss, cfg.lr), batches


def measure_parity(
    trainer: Trainer,
    bare: BareLoop,
    batches: Sequence[Mapping[str, Tensor]],
    steps: int = 60,
    warmup: int = 10,
) -> dict[str, float]:
    """Interleaved step times of both loops; ``ratio`` = median(mmbalance) / median(bare)."""
    ours, theirs = [], []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        order = (trainer, bare) if i % 2 == 0 else (bare, trainer)  # alternate who goes first
        for runner in order:
            t0 = time.perf_counter()
            runner.train_step(b, 0, i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                (ours if runner is trainer else theirs).append(dt * 1e3)
    trainer.flush_terms()
    m_ours, m_bare = statistics.median(ours), statistics.median(theirs)
    return {"mmbalance_ms": m_ours, "bare_ms": m_bare, "ratio": m_ours / m_bare, "steps": steps}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmbalance.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic_cls3")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer, bare, batches = parity_setup(args.dataset, args.batch_size)
    r = measure_parity(trainer, bare, batches, steps=args.steps)
    print(
        f"{args.dataset}, batch {args.batch_size}, {args.threads} thread(s), {args.steps} interleaved steps: "
        f"mmbalance {r['mmbalance_ms']:.3f} ms, bare loop {r['bare_ms']:.3f} ms, ratio {r['ratio']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
