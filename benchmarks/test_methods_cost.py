"""Step-time ratio and memory overhead of every registered method vs ``joint`` (pytest-benchmark).

``pytest benchmarks --benchmark-enable`` times the method's step with pytest-benchmark and records,
in ``extra_info``, the side-by-side ratio measured in the same process (``ratio_vs_joint``), the
FLOP floor, and ``mem_overhead_bytes``; ``--benchmark-compare`` then compares two revisions.
In CI (``--benchmark-disable``) each case runs a few steps so the file cannot rot; ratios are
reported, not asserted. The CPU memory overhead is asserted against a count made here by hand from
the balancer's parameter counts and its optimizers' kinds (not with :mod:`mmbalance.measure`).
"""

from __future__ import annotations

import os

import pytest
import torch

from mmbalance.bench import SYNTHETIC_TASKS, build_pair, method_epoch
from mmbalance.datasets import DATASETS
from mmbalance.measure import compare_cost
from mmbalance.methods import METHODS
from mmbalance.train import TrainConfig

CPU = torch.device("cpu")
STEPS = int(os.environ.get("MMB_BENCH_STEPS", "30"))


def _hand_count_bytes(balancer: torch.nn.Module) -> int:
    """Bytes a balancer costs per step, counted from its parameter counts: float32 parameters (4 bytes
    per element), a gradient of each trainable one (every backward allocates it), its buffers, and per
    stepped parameter Adam/AdamW's two moments (+ max_exp_avg_sq with amsgrad) and 4-byte step, or SGD's
    momentum buffer."""
    params = list({id(p): p for p in balancer.parameters()}.values())
    assert all(p.dtype == torch.float32 for p in params)
    total = 4 * sum(p.numel() for p in params)
    total += 4 * sum(p.numel() for p in params if p.requires_grad)
    total += sum(b.numel() * b.element_size() for b in balancer.buffers())
    for opt in balancer.auxiliary_optimizers():
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in opt.state:
                    continue  # never stepped: no state yet
                if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
                    moments = 3 if group["amsgrad"] else 2
                    total += moments * 4 * p.numel() + 4
                elif isinstance(opt, torch.optim.SGD):
                    total += 4 * p.numel() if group["momentum"] else 0
                else:
                    raise AssertionError(f"no hand count for {type(opt).__name__}")
    return total


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
    cfg = TrainConfig(epochs=8, batch_size=64, eval_modality_scores=False)
    epoch = method_epoch(method, ds.spec, cfg.epochs)  # the last epoch, inside the method's window
    trainers, batches = build_pair(
        method, ds.spec, ds.spec.default_model, model_preset=None, train_set=ds.split("train"),
        val_set=ds.split("val"), cfg=cfg, device=CPU, epoch=epoch,
    )
    batches = batches[: steps + warmup]
    method_trainer, joint_trainer = trainers["method"], trainers["joint"]
    cost = compare_cost(
        method_trainer, joint_trainer, batches, steps=steps, warmup=warmup, device=CPU, epoch=epoch
    )
    expected = _hand_count_bytes(trainers["method"].balancer)
    assert cost["mem_overhead_bytes"] == expected  # joint adds nothing, so the overhead is exactly this
    benchmark.extra_info.update(
        method=method, task=task, ratio_vs_joint=cost["step_time_ratio"],
        mem_overhead_bytes=cost["mem_overhead_bytes"], step_ms_median=cost["step_ms_median"],
        joint_step_ms_median=cost["joint_step_ms_median"],
    )
    step = trainers["method"]
    rounds = steps if not benchmark.disabled else 1
    benchmark.pedantic(step.train_step, args=(batches[0], epoch, 0), rounds=rounds, iterations=1)
    step.flush_terms()
