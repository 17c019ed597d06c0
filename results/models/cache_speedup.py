"""Epoch time of ``vit_bert`` with and without the frozen-feature cache (CPU), for README.md.

    PYTHONPATH=. python results/models/cache_speedup.py --config reduced
    PYTHONPATH=. python results/models/cache_speedup.py --config full --n 32 --epochs 2

Data: an in-memory Food-101-shaped subset (random 224 x 224 images in [0, 1], 50 token ids with
padding, 101 classes), identical for both modes. Both modes train the same trainable part
(same seed, same initial weights) with ``joint`` through :meth:`mmbalance.train.Trainer.train_epoch`
(the library's step: forward, backward, clipping at 0.8, AdamW). "uncached" runs the frozen
extractors inside every step; "cached" runs them once over the split first (``prepare_splits``,
fp16 features in memory), then trains on the stored tokens. ``reduced`` shrinks the extractors
(ViT 4 blocks of width 192, BERT 4 layers of width 256) so the measurement runs in seconds; the
token counts (197 + 50) and the trainable part (d = 40, 4 + 2 layers) keep the official shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.methods.joint import Joint
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, make_loader

CONFIGS = {
    "reduced": {
        "vit_depth": 4,
        "vit_dim": 192,
        "vit_heads": 3,
        "bert_layers": 4,
        "bert_dim": 256,
        "bert_heads": 4,
    },
    "full": {},  # ViT-B/16 + BERT-base
}


def epoch_times(model, dataset, epochs: int, batch: int) -> tuple[list[float], list[float]]:
    """(wall-clock, process CPU) seconds of each training epoch."""
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=6e-3,
        clip_grad_norm=0.8,
        cost_steps=0,
        deterministic=False,
    )
    device = torch.device("cpu")
    loader = make_loader(dataset, cfg, device, train=True)
    trainer = Trainer(model, Joint(), make_task("cls", 101), cfg, device, len(loader))
    wall, cpu = [], []
    for e in range(epochs):
        c0 = time.process_time()
        wall.append(trainer.train_epoch(loader, e)["epoch_time_s"])
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--n", type=int, default=128, help="training samples")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.n, 50), generator=g)
    ids[:, 30:] = 0
    data = TensorDictDataset(
        {
            "image": torch.rand(args.n, 3, 224, 224, generator=g),
            "text": ids,
            "target": torch.randint(0, 101, (args.n,), generator=g),
        }
    )
    spec = DatasetSpec("cls", {"image": (3, 224, 224), "text": (50,)}, 101)
    sizes = CONFIGS[args.config]

    torch.manual_seed(0)
    uncached_model = MODELS.build("vit_bert", "food101", **sizes)(spec)
    uncached, uncached_cpu = epoch_times(uncached_model, data, args.epochs, args.batch)
    del uncached_model

    builder = MODELS.build("vit_bert", "food101", cache_features=True, **sizes)
    t0, c0 = time.perf_counter(), time.process_time()
    splits, cached_spec = builder.prepare_splits({"train": data}, spec)  # builds the extractors too
    extract_s, extract_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.manual_seed(0)
    cached, cached_cpu = epoch_times(builder(cached_spec), splits["train"], args.epochs, args.batch)

    print(f"config={args.config} n={args.n} batch={args.batch} epochs={args.epochs} threads={args.threads}")
    for label, u, c, x in (
        ("wall", uncached, cached, extract_s),
        ("cpu", uncached_cpu, cached_cpu, extract_cpu),
    ):
        med_u, med_c = statistics.median(u), statistics.median(c)
        print(
            f"[{label}] uncached epochs s {[round(t, 2) for t in u]} | "
            f"cached epochs s {[round(t, 2) for t in c]} + one-off extraction {x:.2f} s"
        )
        print(
            f"[{label}] per-epoch speed-up (median) {med_u / med_c:.1f}x; "
            f"{args.epochs} epochs incl. extraction {sum(u):.1f} s vs {x + sum(c):.1f} s "
            f"= {sum(u) / (x + sum(c)):.2f}x"
        )


if __name__ == "__main__":
    main()
