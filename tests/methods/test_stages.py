"""Stage helpers shared by multi-stage methods (mmbalance/methods/_stages.py)."""

from __future__ import annotations

import torch

from mmbalance.methods._stages import train_pass
from mmbalance.train import TrainConfig, batch_to_device, make_loader

from ..conftest import tiny_splits

CPU = torch.device("cpu")


def test_train_pass_steps_once_per_batch_up_to_the_cap_like_a_plain_loop():
    splits, _ = tiny_splits()  # 48 training samples: 3 batches of 16
    loader = make_loader(splits["train"], TrainConfig(batch_size=16, cost_steps=0), CPU, train=False)
    weights = [torch.zeros(4, requires_grad=True) for _ in range(2)]
    optimizers = [torch.optim.SGD([w], lr=0.1, momentum=0.9) for w in weights]

    def loss_fn(w):
        return lambda batch: ((batch["a"] @ w - batch["target"].float()) ** 2).mean()

    def to_device(batch):
        return batch_to_device(batch, CPU)

    assert train_pass(loss_fn(weights[0]), optimizers[0], loader, to_device) == 3
    assert train_pass(loss_fn(weights[0]), optimizers[0], loader, to_device, max_batches=2) == 2
    for raw in list(loader) + list(loader)[:2]:  # the same five steps, written out
        batch = to_device(raw)
        optimizers[1].zero_grad(set_to_none=True)
        loss_fn(weights[1])(batch).backward()
        optimizers[1].step()
    assert torch.equal(weights[0], weights[1])
