"""CUDA memory accounting (``gpu``): the overhead of a method against joint is its peak-allocated
delta plus what it keeps resident between steps, checked on probes of known size and on CGGM."""

from __future__ import annotations

import pytest
import torch

from mmbalance.bench import build_pair, run_bench
from mmbalance.datasets import DATASETS
from mmbalance.measure import compare_cost, persistent_state_bytes
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.train import TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MIB = 2**20
RESIDENT = 8 * MIB  # a buffer kept between steps
TRANSIENT = 16 * MIB  # a tensor alive from the forward pass to the end of the step
SLACK = 1 * MIB  # allocator rounding and the probes' own small differences


@pytest.fixture
def probes():
    """Joint plus a known resident buffer, and joint plus a known tensor alive through backward."""

    @METHODS.register("probe_resident")
    class ProbeResident(Joint):
        paper = "test probe"

        def setup(self, model, task, optimizer_factory):
            super().setup(model, task, optimizer_factory)
            self.register_buffer("blob", torch.zeros(RESIDENT // 4))

    @METHODS.register("probe_transient")
    class ProbeTransient(Joint):
        paper = "test probe"

        def forward_step(self, model, batch):
            output = model(batch)
            output.extras["blob"] = torch.zeros(TRANSIENT // 4, device=batch["target"].device)
            return output

    yield
    METHODS.unregister("probe_resident")
    METHODS.unregister("probe_transient")


def test_resident_and_transient_bytes_are_both_counted(probes):
    report = run_bench(["probe_resident", "probe_transient"], ["synthetic_reg3"], device="cuda", steps=3,
                       warmup=1, progress=False)
    overhead = {r["method"]: r["mem_overhead_bytes"] for r in report["results"]}
    assert RESIDENT <= overhead["probe_resident"] <= RESIDENT + SLACK, overhead
    assert TRANSIENT <= overhead["probe_transient"] <= TRANSIENT + SLACK, overhead
    assert all(r["memory_kind"] == "cuda_peak_allocated" for r in report["results"])


def test_cggm_overhead_covers_its_heads_and_their_optimizer_state():
    ds = DATASETS.build("synthetic_reg3")
    spec, device = ds.spec, torch.device("cuda")
    cfg = TrainConfig(batch_size=64, eval_modality_scores=False)
    trainers, batches = build_pair(
        "cggm", spec, spec.default_model, model_preset=None, train_set=ds.split("train"),
        val_set=ds.split("val"), cfg=cfg, device=device,
    )
    cost = compare_cost(trainers["method"], trainers["joint"], batches, steps=3, warmup=1, device=device)
    cggm = trainers["method"].balancer
    resident = persistent_state_bytes(cggm, cggm.auxiliary_optimizers(), gradients=False)
    assert resident > 0 and cost["mem_overhead_bytes"] >= resident, (cost, resident)
