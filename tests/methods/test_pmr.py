"""PMR: prototypes, prototypical logits and loss weights by hand; EMA schedule; alpha=0 == joint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.methods.pmr import PMR, PMRConfig, class_prototypes, pmr_weights, prototype_logits
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, fit, make_loader

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")


def test_class_prototypes_by_hand():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    sums, counts = class_prototypes(z, torch.tensor([0, 0, 1]), 3)
    assert torch.equal(sums, torch.tensor([[4.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(counts, torch.tensor([2.0, 1.0, 0.0]))


def test_prototype_logits_are_negative_euclidean_distances():
    logits = prototype_logits(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([[-5.0, -1.0], [0.0, -((9.0 + 9.0) ** 0.5)]]))


def test_loss_weights_accelerate_only_the_slower_modality():
    assert pmr_weights(torch.tensor([10.0, 20.0]), 2.0).tolist() == [2.0, 0.0]  # audio slower: beta = alpha
    assert pmr_weights(torch.tensor([20.0, 10.0]), 2.0).tolist() == [
        0.0,
        2.0,
    ]  # visual slower: lambda = alpha
    assert pmr_weights(torch.tensor([7.0, 7.0]), 2.0).tolist() == [0.0, 0.0]  # tie: none
    # three modalities s = (1, 2, 4): rho = (0.375, 1.25, 3) -> only the first is slower
    assert pmr_weights(torch.tensor([1.0, 2.0, 4.0]), 0.5).tolist() == [0.5, 0.0, 0.0]


def _setup(balancer, seed=0):
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, seed=seed, eval_modality_scores=False, cost_steps=0)
    torch.manual_seed(seed)
    trainer = Trainer(tiny_model(seed=seed), balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    train_loader = make_loader(splits["train"], cfg, CPU, train=True)

    def ctx(epoch):
        return EpochContext(
            model=trainer.model,
            epoch=epoch,
            num_epochs=3,
            train_loader=train_loader,
            val_loader=make_loader(splits["val"], cfg, CPU, train=False),
            task=trainer.task,
            device=CPU,
            optimizer=trainer.optimizer,
            to_device=lambda b: batch_to_device(b, CPU),
        )

    return trainer, splits, ctx


def _full_means(model, data, m):
    with torch.no_grad():
        z = model.encoders[m](data[m])
    sums, counts = class_prototypes(z, data["target"], 3)
    return sums / counts[:, None]


def test_prototypes_are_class_means_with_ema_from_the_third_update():
    bal = PMR(PMRConfig(momentum_coef=0.25, proto_fraction=1.0))
    trainer, splits, ctx = _setup(bal)
    data = splits["train"].tensors
    enc = trainer.model.encoders["a"][0]
    bal.on_train_epoch_start(ctx(0))
    torch.testing.assert_close(bal.proto_a, _full_means(trainer.model, data, "a"))
    with torch.no_grad():
        enc.weight.mul_(1.5)
    bal.on_train_epoch_start(ctx(1))  # second update: no EMA yet (official epoch <= 0 branch)
    mean1 = _full_means(trainer.model, data, "a")
    torch.testing.assert_close(bal.proto_a, mean1)
    with torch.no_grad():
        enc.weight.mul_(0.5)
    bal.on_train_epoch_start(ctx(2))
    mean2 = _full_means(trainer.model, data, "a")
    torch.testing.assert_close(bal.proto_a, 0.75 * mean2 + 0.25 * mean1)
    assert bal.proto_batches == 3 * 3  # 48 samples / batch 16, all batches each time
    assert trainer.model.training


def test_proto_term_is_alpha_times_the_slower_modalitys_prototype_ce():
    bal = PMR(PMRConfig(alpha=2.0))
    trainer, splits, ctx = _setup(bal)
    bal.on_train_epoch_start(ctx(0))
    assert bal.proto_batches == 1  # 10 % of 3 batches, at least one
    batch = {k: v[:16] for k, v in splits["train"].tensors.items()}
    out = bal.forward_step(trainer.model, batch)
    terms = bal.loss_terms(out, batch, trainer.task)
    ce, score = {}, {}
    for m in ("a", "b"):
        logits = -torch.cdist(out.features[m], getattr(bal, f"proto_{m}"))
        ce[m] = F.cross_entropy(logits, batch["target"])
        score[m] = F.softmax(logits, 1)[torch.arange(16), batch["target"]].sum()
    slower = "a" if score["a"] < score["b"] else "b"
    torch.testing.assert_close(terms["proto"], 2.0 * ce[slower])
    torch.testing.assert_close(terms["task"], F.cross_entropy(out.prediction, batch["target"]))


def test_alpha0_reproduces_joint_exactly():
    splits, spec = tiny_splits()
    cfg = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)
    task = make_task("cls", 3)
    results = []
    for bal in (Joint(), PMR(PMRConfig(alpha=0.0))):
        torch.manual_seed(0)
        model = tiny_model()
        fit(model, bal, splits, spec, task, cfg, CPU)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_classification_only_and_config_errors():
    assert not METHODS.get("pmr").supports(task="reg")
    with pytest.raises(UnsupportedError, match="pmr"):
        splits, spec = tiny_splits()
        from dataclasses import replace

        fit(
            tiny_model(),
            PMR(),
            splits,
            replace(spec, task="reg", num_outputs=1),
            make_task("reg", 1),
            TrainConfig(epochs=1, batch_size=16, cost_steps=0),
            CPU,
        )
    with pytest.raises(ConfigError, match="momentum_coef"):
        METHODS.build("pmr", None, momentum_coef=1.0)
    with pytest.raises(ConfigError, match="proto_fraction"):
        METHODS.build("pmr", None, proto_fraction=0.0)
