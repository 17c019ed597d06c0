"""DI-MML: effective and own dimensions, DUC loss and certainty fusion by hand; detached training
(which loss reaches which parameters); the dimension scan and its state; stage 2; config errors;
short fits on every declared task."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.di_mml import (
    DIMML,
    DIMMLConfig,
    certainty_fusion,
    duc_loss,
    effective_dimensions,
    own_dimensions,
)
from mmbalance.models.base import Head, MultimodalModel
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, batch_to_device, make_loader

from ..conftest import ConcatFusion, tiny_splits
from ._helpers import short_fit, tiny_trainer

CPU = torch.device("cpu")
LN3 = math.log(3.0)


def test_effective_dimensions_by_hand():
    # labels (0, 0, 1, 1); three dimensions:
    # dim 0: class 0 (0, 2) -> c0 = 1; class 1 (4, 6) -> c1 = 5; every sample nearest its own: acc 1
    # dim 1: class 0 (0, 1), class 1 (1, 0): c0 = c1 = 0.5, argmin takes class 0 -> acc 1/2
    # dim 2: class 0 (4, 4) -> c0 = 4; class 1 (0, 5) -> c1 = 2.5; 0 -> class 1, 5 -> class 0: acc 3/4
    # mean accuracy 3/4: only dim 0 is above it (dim 2 equals it: not effective)
    features = torch.tensor([[0.0, 0.0, 4.0], [2.0, 1.0, 4.0], [4.0, 1.0, 0.0], [6.0, 0.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert effective_dimensions(features, labels, 2).tolist() == [True, False, False]
    assert effective_dimensions(features, labels, 3).tolist() == [True, False, False]
    # A class without samples has no centroid. Labels (0, 0, 1, 1):
    # dim 0: (0, 1 | 5, 6): c0 = 0.5, c1 = 5.5 -> acc 1; dim 1: (5, 6 | 1, 2): c0 = 5.5, c1 = 1.5 -> acc 1;
    # dim 2: all 0.5, c0 = c1 -> class 0 -> acc 1/2. Mean 5/6: dims 0 and 1 effective.
    # (An absent class 2 taken at the origin would be nearest to the value 0 of dim 0: acc 3/4,
    # mean 3/4, and only dim 1 effective.)
    features = torch.tensor([[0.0, 5.0, 0.5], [1.0, 6.0, 0.5], [5.0, 1.0, 0.5], [6.0, 2.0, 0.5]])
    assert effective_dimensions(features, labels, 2).tolist() == [True, True, False]
    assert effective_dimensions(features, labels, 3).tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="no training sample"):
        effective_dimensions(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2)


def test_effective_dimensions_in_chunks_match_the_whole_computation():
    g = torch.Generator().manual_seed(0)
    n, k, d = 30_000, 10, 20  # chunks of 2**22 // 200 = 20971 samples: two chunks
    labels = torch.randint(0, k, (n,), generator=g)
    features = torch.randn(n, d, generator=g) + labels[:, None] * torch.linspace(0, 1, d)
    centroids = torch.stack([features[labels == c].mean(dim=0) for c in range(k)])
    nearest = (features[:, None, :] - centroids[None]).abs().argmin(dim=1)
    accuracy = (nearest == labels[:, None]).double().mean(dim=0)
    expected = accuracy > accuracy.mean()
    assert 0 < int(expected.sum()) < d
    assert torch.equal(effective_dimensions(features, labels, k), expected)


def test_own_dimensions_by_hand():
    effective = torch.tensor([[True, True, False, False], [False, True, True, False]])
    # audio_only = top_a - top_v = {0}; image_only = top_v - top_a = {2}
    assert own_dimensions(effective).tolist() == [[True, False, False, False], [False, False, True, False]]
    three = torch.tensor([[True, True, False], [False, True, True], [False, False, True]])
    assert own_dimensions(three).tolist() == [[True, False, False], [False] * 3, [False] * 3]


def test_duc_loss_by_hand():
    # a owns dim 0, v owns dim 1.
    # v <- a on dim 0: logits = f_v[:, 0] f_a[:, 0]^T = [[ln3, 0], [0, 0]]: CE = ln(4/3) (row 0), ln 2
    # a <- v on dim 1: logits = f_a[:, 1] f_v[:, 1]^T = [[0, 2], [0, 0]]: CE = ln(1 + e²) (row 0), ln 2
    f_a = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    f_v = torch.tensor([[LN3, 0.0], [0.0, 1.0]], requires_grad=True)
    own = torch.tensor([[True, False], [False, True]])
    loss = duc_loss({"a": f_a, "v": f_v}, own, temperature=1.0)
    expected = (math.log(4 / 3) + math.log(2)) / 2 + (math.log(1 + math.e**2) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # τ = 2 halves the logits: v <- a row 0: [ln3/2, 0] -> CE = ln(1 + 1/√3); a <- v row 0: [0, 1]
    halved = duc_loss({"a": f_a, "v": f_v}, own, temperature=2.0)
    expected2 = (math.log(1 + 1 / math.sqrt(3)) + math.log(2)) / 2 + (math.log(1 + math.e) + math.log(2)) / 2
    assert halved.item() == pytest.approx(expected2, rel=1e-6)
    loss.backward()
    # unidirectional: a learns only on v's dimension, v only on a's (the teacher side is detached)
    assert f_a.grad[:, 0].abs().sum() == 0 and f_a.grad[0, 1] != 0
    assert f_v.grad[:, 1].abs().sum() == 0 and f_v.grad[0, 0] != 0
    # no own dimensions: every logit 0, CE = ln B per pair
    none = duc_loss({"a": f_a, "v": f_v}, torch.zeros(2, 2, dtype=torch.bool), 1.0)
    assert none.item() == pytest.approx(2 * math.log(2))
    with pytest.raises(ShapeError, match=r"own dimensions have shape \(2, 3\), expected \(2, 2\)"):
        duc_loss({"a": f_a, "v": f_v}, torch.zeros(2, 3, dtype=torch.bool), 1.0)


def test_duc_loss_three_modalities_averages_each_learners_terms():
    torch.manual_seed(0)
    feats = {m: torch.randn(4, 6) for m in "abc"}
    own = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    pairs = []
    for n in "abc":
        for j, m in enumerate("abc"):
            if m != n:
                mask = own[j].float()
                logits = (feats[n] * mask) @ (feats[m] * mask).T
                pairs.append(nn.functional.cross_entropy(logits, torch.arange(4)))
    # six ordered pairs, each learner's two terms averaged: Σ / (M - 1)
    assert duc_loss(feats, own, 1.0).item() == pytest.approx(sum(p.item() for p in pairs) / 2, rel=1e-6)


def test_certainty_fusion_by_hand():
    # l1 = (ln3, 0): max softmax 3/4; l2 = (0, 0): 1/2. T = 1: w1 = e^.75 / (e^.75 + e^.5) = 0.5621765
    # fused = w1 l1 + w2 l2 = (0.5621765 ln 3, 0) = (0.6176140, 0)
    l1, l2 = torch.tensor([[LN3, 0.0]]), torch.zeros(1, 2)
    torch.testing.assert_close(certainty_fusion([l1, l2], 1.0), torch.tensor([[0.6176140, 0.0]]))
    # T = 0.5 sharpens: w1 = 1 / (1 + e^-0.5) = 0.6224593 -> (0.6838415, 0)
    torch.testing.assert_close(certainty_fusion([l1, l2], 0.5), torch.tensor([[0.6838415, 0.0]]))
    # per sample: a sample where both predictors are equally certain gets weights (1/2, 1/2)
    both = certainty_fusion([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])], 1.0)
    torch.testing.assert_close(both, torch.tensor([[1.0, 1.0]]))


def _ctx(trainer, epoch, num_epochs=4):
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, eval_modality_scores=False, cost_steps=0)
    return EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=num_epochs,
        train_loader=make_loader(splits["train"], cfg, CPU, train=True),
        val_loader=make_loader(splits["val"], cfg, CPU, train=False), task=trainer.task, device=CPU,
        optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    )


def _grads(model, term):
    model.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_reaches_only_its_own_parameters():
    bal = DIMML(DIMMLConfig(contrast_start=0))
    trainer, batches = tiny_trainer(bal)
    bal.on_train_epoch_start(_ctx(trainer, 0))
    output = bal.forward_step(trainer.model, batches[0])
    terms = bal.loss_terms(output, batches[0], trainer.task)
    assert set(terms) == {"task", "unimodal/a", "unimodal/b", "align/a", "align/b", "duc"}
    model = trainer.model
    # the fusion learns on detached features: no joint gradient reaches the encoders
    fusion_grads = _grads(model, terms["task"])
    assert fusion_grads and not any(n.startswith("encoders.") for n in fusion_grads)
    for m in ("a", "b"):
        for term in (terms[f"unimodal/{m}"], terms[f"align/{m}"]):
            assert {n.split(".")[1] for n in _grads(model, term)} == {m}
    assert {n.split(".")[1] for n in _grads(model, terms["duc"])} == {"a", "b"}
    shared = bal.shared.heads["shared"].net.weight
    bal.zero_grad(set_to_none=True)
    terms["align/a"].backward(retain_graph=True)
    assert shared.grad is not None and all(p.grad is None for p in bal.heads.parameters())


def test_dimension_scan_once_and_its_state_resumes():
    bal = DIMML(DIMMLConfig(contrast_start=1))
    trainer, batches = tiny_trainer(bal)
    bal.on_train_epoch_start(_ctx(trainer, 0))
    assert not bool(bal.dims_found) and "duc" not in bal.loss_terms(
        bal.forward_step(trainer.model, batches[0]), batches[0], trainer.task
    )
    rng = torch.get_rng_state()
    bal.on_train_epoch_start(_ctx(trainer, 1))
    assert torch.equal(rng, torch.get_rng_state())  # the scan draws nothing from the run's RNG
    assert bool(bal.dims_found) and bal.own_dims.shape == (2, 8)
    assert not (bal.own_dims[0] & bal.own_dims[1]).any()
    found = bal.own_dims.clone()
    with torch.no_grad():
        for p in trainer.model.encoders.parameters():
            p.add_(1.0)
    bal.on_train_epoch_start(_ctx(trainer, 2))  # found once (main_CFT.py: at epoch 20 only)
    assert torch.equal(bal.own_dims, found)
    diag = bal.diagnostics()
    assert diag["dims_found"] == 1.0 and diag["own_dims/a"] == float(found[0].sum())
    buffer = io.BytesIO()
    torch.save(bal.training_state(), buffer)
    fresh = DIMML(DIMMLConfig(contrast_start=1))
    tiny_trainer(fresh)
    fresh.load_training_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(fresh.own_dims, found) and bool(fresh.dims_found)


def test_stage_two_trains_the_fusion_alone_on_frozen_encoders():
    bal = DIMML(DIMMLConfig(fusion_epochs=1))
    trainer, batches = tiny_trainer(bal)
    trainer.train_step(batches[0], 0, 0)  # builds the heads and their optimizers
    bal.on_train_epoch_start(_ctx(trainer, 3, num_epochs=4))
    heads = [p.clone() for p in list(bal.heads.parameters()) + list(bal.shared.parameters())]
    encoders = [p.clone() for p in trainer.model.encoders.parameters()]
    fusion = [p.clone() for p in trainer.model.head.parameters()]
    output = bal.forward_step(trainer.model, batches[1])
    assert set(bal.loss_terms(output, batches[1], trainer.task)) == {"task"}
    assert all(not f.requires_grad for f in output.features.values())
    trainer.train_step(batches[1], 3, 0)
    after = list(bal.heads.parameters()) + list(bal.shared.parameters())
    assert all(torch.equal(p, q) for p, q in zip(heads, after, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(encoders, trainer.model.encoders.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(fusion, trainer.model.head.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"fusion_epochs must be smaller than the run's epochs \(4\), got"):
        DIMML(DIMMLConfig(fusion_epochs=4)).on_train_epoch_start(_ctx(trainer, 0))


def test_predict_is_the_certainty_fusion_of_own_classifiers_and_fusion():
    bal = DIMML()
    trainer, batches = tiny_trainer(bal)
    trainer.train_step(batches[0], 0, 0)
    output = trainer.model(batches[1])
    own = bal.heads(output.features)
    expected = certainty_fusion([own["a"], own["b"], output.prediction], 1.0)
    torch.testing.assert_close(bal.predict(output), expected)
    assert set(bal.inference_state_dict()) == {k for k in bal.state_dict() if k.startswith("heads.")}


def test_features_of_different_widths_and_unsupported_tasks_are_errors():
    model = MultimodalModel(
        {"a": nn.Linear(4, 8), "b": nn.Linear(3, 5)}, ConcatFusion(),
        Head(nn.Sequential(nn.Linear(13, 8), nn.ReLU()), nn.Linear(8, 3)),
    )
    bal = DIMML()
    bal.setup(model, make_task("cls", 3), lambda params, lr=None: torch.optim.SGD(params, lr=0.1))
    splits, _ = tiny_splits()
    batch = {k: v[:4] for k, v in splits["train"].tensors.items()}
    with pytest.raises(ShapeError, match="dimension by dimension"):
        bal.forward_step(model, batch)
    assert not DIMML.supports(task="reg") and DIMML.supports(task="cls", modalities=3)
    with pytest.raises(UnsupportedError):
        spec = type("Spec", (), {"task": "reg", "modalities": {"a": (1,), "b": (1,)}})
        METHODS.build("di_mml").check_supported(spec)


def test_config_errors():
    for key, value, match in [
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("fusion_temperature", math.nan, "fusion_temperature must be a finite number > 0"),
        ("align_weight", -1.0, "align_weight must be a finite number >= 0"),
        ("contrast_start", -1, "contrast_start must be an integer >= 0"),
        ("fusion_epochs", -2, "fusion_epochs must be an integer >= 0"),
        ("scan_batches", 0, "scan_batches must be None or an integer >= 1"),
        ("head_lr", 0.0, "head_lr must be None or > 0"),
        ("sequence_pool", "max", "sequence_pool must be one of"),
    ]:
        with pytest.raises(ConfigError, match=match):
            METHODS.build("di_mml", None, **{key: value})


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3"])
def test_short_fit_on_every_declared_task(dataset):
    result = short_fit("di_mml", dataset, samples=64, epochs=3, contrast_start=1, fusion_epochs=1)
    terms = [set(h["terms"]) for h in result.history]
    assert "duc" not in terms[0] and "duc" in terms[1] and terms[2] == {"task"}
    assert result.history[1]["diagnostics"]["dims_found"] == 1.0
