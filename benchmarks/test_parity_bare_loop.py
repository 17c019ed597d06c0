"""Runner overhead: ``joint`` through mmbalance vs a bare PyTorch loop (ratio reported, not asserted).

Run: ``pytest benchmarks/test_parity_bare_loop.py --benchmark-enable``.
"""

from __future__ import annotations

import os

import torch

from mmbalance.parity import measure_parity, parity_setup

STEPS = int(os.environ.get("MMB_PARITY_STEPS", "60"))


def test_parity_ratio(benchmark):
    torch.set_num_threads(1)
    trainer, bare, batches = parity_setup("synthetic_cls3", batch_size=64, n_batches=8)
    enabled = not benchmark.disabled
    r = measure_parity(trainer, bare, batches, steps=STEPS if enabled else 5, warmup=10 if enabled else 1)
    benchmark.extra_info.update(method="joint", task="synthetic_cls3", ratio_vs_bare=r["ratio"], **r)
    benchmark(trainer.train_step, batches[0], 0, 0)
    assert r["ratio"] > 0
