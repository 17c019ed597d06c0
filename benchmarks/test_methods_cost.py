"""Step-time ratio and memory overhead of every registered method vs ``joint`` (pytest-benchmark).

``pytest benchmarks --benchmark-enable`` times the method's step with pytest-benchmark and records,
in ``extra_info``, the side-by-side ratio measured in the same process (``ratio_vs_joint``), the
FLOP floor, and ``mem_overhead_bytes``; ``--benchmark-compare`` then compares two revisions.
In CI (``--benchmark-disable``) each case runs a few steps so the file cannot rot; ratios are
reported, not asserted. The exact CPU byte count of the method's persistent state is asserted.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmbalance.bench import SYNTHETIC_TASKS, build_pair
from mmbalance.datasets import DATASETS
from mmbalance.measure import compare_cost, persistent_state_bytes
from mmbalance.methods import METHODS
from mmbalance.train import TrainConfig

CPU = torch.device("cpu")
STEPS = int(os.environ.get("MMB_BENCH_STEPS", "30"))


def _cases():
    out = []
    for method in METHODS.names():
        if method == "joint":
            continue
        for task in SYNTHETIC_TASKS:
            d = DATASETS.get(task)
            if METHODS.get(method).supports(task=d.task, modalities=len(d.modality_names)):
                out.append((method, task))
    return out


@pytest.mark.parametrize("method, task", _cases())
def test_method_cost(benchmark, method, task):
    torch.set_num_threads(1)
    ds = DATASETS.build(task)
    steps, warmup = (STEPS, 5) if not benchmark.disabled else (3, 1)
    cfg = TrainConfig(batch_size=64, eval_modality_scores=False, cost_steps=steps, cost_warmup=warmup)
    trainers, batches = build_pair(
        method, ds.spec, ds.spec.default_model, model_preset=None, train_set=ds.split("train"),
        val_set=ds.split("val"), cfg=cfg, device=CPU,
    )
    batches = batches[: steps + warmup]
    cost = compare_cost(trainers["method"], trainers["joint"], batches, steps=steps, warmup=warmup, device=CPU)
    balancer = trainers["method"].balancer
    expected = persistent_state_bytes(balancer, balancer.auxiliary_optimizers())
    assert cost["mem_overhead_bytes"] == expected  # joint adds nothing, so the overhead is exactly this
    benchmark.extra_info.update(
        method=method, task=task, ratio_vs_joint=cost["step_time_ratio"], mem_overhead_bytes=cost["mem_overhead_bytes"],
        step_ms_median=cost["step_ms_median"], joint_step_ms_median=cost["joint_step_ms_median"],
    )
    step = trainers["method"]
    benchmark.pedantic(step.train_step, args=(batches[0], 0, 0), rounds=steps if not benchmark.disabled else 1, iterations=1)
    step.flush_terms()
