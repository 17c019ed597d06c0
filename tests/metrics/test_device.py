"""On CUDA: metric updates, task losses and scores run without a host sync and match the CPU."""

from __future__ import annotations

import pytest
import torch

from mmbalance.tasks import make_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def batches(name: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in (5, 3):
        if name == "cls":
            out.append((torch.randn(batch, 7, generator=g), torch.randint(0, 7, (batch,), generator=g)))
        elif name == "reg":
            out.append((torch.randn(batch, 1, generator=g), torch.randn(batch, generator=g)))
        else:
            out.append(
                (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 4, (batch, 8, 8), generator=g))
            )
    return out


@pytest.mark.parametrize("name,classes", [("cls", 7), ("reg", 1), ("seg", 4)])
def test_no_sync_in_update_loss_score_and_same_numbers(name: str, classes: int) -> None:
    task = make_task(name, classes)
    data = batches(name, seed=0)
    cpu_suite, gpu_suite = task.metrics(), task.metrics()
    for prediction, target in data:
        cpu_suite.update(prediction, target)
    device = torch.device("cuda")
    on_device = [(p.to(device), t.to(device)) for p, t in data]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for prediction, target in on_device:
            gpu_suite.update(prediction, target)
            task.loss(prediction, target)
            task.loss(prediction, target, reduction="none")
            task.score(prediction, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu_suite.compute() == pytest.approx(cpu_suite.compute(), rel=1e-5, abs=1e-6, nan_ok=True)
