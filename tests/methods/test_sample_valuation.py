"""Sample valuation: Shapley contributions and re-sampling plans by hand, the masked passes against the
official two-modality formula, the duplicates inside the steps, alpha=0 == joint, resume inside an epoch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods._shapley import correct_predictions, shapley_matrix, subset_values, valuate
from mmbalance.methods.sample_valuation import (
    SampleValuation,
    SampleValuationConfig,
    resample_share,
    sample_copies,
    sample_level_plan,
)
from mmbalance.tasks import make_task
from mmbalance.testing import check_state_round_trip
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

from ..conftest import tiny_model, tiny_splits
from ._helpers import assert_fits_like_joint, short_fit

CPU = torch.device("cpu")


# -- the arithmetic by hand ---------------------------------------------------------------------------
def test_shapley_values_by_hand_two_modalities():
    # subsets by bit mask: 0 = {}, 1 = {a}, 2 = {v}, 3 = {a, v}; both weights are 1/2
    # phi_a = 1/2 [v(a) - v()] + 1/2 [v(a,v) - v(v)],  phi_v = 1/2 [v(v) - v()] + 1/2 [v(a,v) - v(a)]
    expected = torch.tensor([[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(shapley_matrix(2), expected)
    # samples (columns): correct from (a alone, v alone, both) =
    #   (1, 0, 1): v = (0, 1, 0, 2) -> phi_a = (1 + 2 - 0) / 2 = 1.5, phi_v = (0 + 2 - 1) / 2 = 0.5
    #   (0, 1, 0): v = (0, 0, 1, 0) -> phi_a = (0 + 0 - 1) / 2 = -0.5, phi_v = (1 + 0 - 0) / 2 = 0.5
    #   (0, 0, 0): all 0;   (1, 1, 1): phi_a = phi_v = (1 + 2 - 1) / 2 = 1
    # rows: {a}, {v}, {a, v}
    correct = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    phi = shapley_matrix(2) @ subset_values(correct)
    torch.testing.assert_close(phi.t(), torch.tensor([[1.5, 0.5], [-0.5, 0.5], [0.0, 0.0], [1.0, 1.0]],
                                                     dtype=torch.float64))


def test_shapley_values_by_hand_three_modalities():
    # w(|S|) = |S|! (2 - |S|)! / 3! = 1/3, 1/6, 1/3 for |S| = 0, 1, 2. Correct alone with {a} and with
    # all three, nothing else: v(a) = 1, v(a,b,c) = 3.
    # phi_a = 1/3 (1 - 0) + 1/6 (0 - 0) + 1/6 (0 - 0) + 1/3 (3 - 0) = 4/3
    # phi_b = 1/3 (0 - 0) + 1/6 (v(ab) - v(a) = -1) + 1/6 (0 - 0) + 1/3 (3 - 0) = 5/6 = phi_c
    correct = torch.zeros(7, 1, dtype=torch.bool)
    correct[0, 0] = correct[6, 0] = True  # masks 1 = {a} and 7 = {a, b, c}
    phi = (shapley_matrix(3) @ subset_values(correct))[:, 0]
    torch.testing.assert_close(phi, torch.tensor([4 / 3, 5 / 6, 5 / 6], dtype=torch.float64))
    assert phi.sum().item() == pytest.approx(3.0)  # efficiency: sum = v(all)


def test_correct_predictions_cls_and_reg():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert correct_predictions(logits, torch.tensor([0, 0]), "cls").tolist() == [True, False]
    # signs: 0.5 vs 1 agree, -1 vs -2 agree, 0 (negative) vs 0.5 disagree
    got = correct_predictions(torch.tensor([[0.5], [-1.0], [0.0]]), torch.tensor([1.0, -2.0, 0.5]), "reg")
    assert got.tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="seg"):
        correct_predictions(logits, torch.tensor([0, 0]), "seg")


def test_sample_copies_use_the_official_bins():
    # (0.4, 1) -> 1 copy, (-0.1, 0.4) -> 2, < -0.1 -> 3, >= 1 -> 0 (dataloader.py)
    phi = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, 0.9, 0.3, -0.05, -0.2])
    assert sample_copies(phi).tolist() == [0, 0, 1, 2, 3, 1, 2, 2, 3]


def test_sample_level_plan_by_hand():
    # sample 0: phi = (0.5, 1.5) -> 1 copy keeping modality 0
    # sample 1: phi = (-0.5, 0.0) -> 3 copies keeping 0, 2 keeping 1
    index, keep = sample_level_plan(torch.tensor([[0.5, 1.5], [-0.5, 0.0]]))
    assert index.tolist() == [0, 1, 1, 1, 1, 1]
    assert keep.tolist() == [0, 0, 0, 0, 1, 1]


def test_resample_share_by_hand():
    # official: gap_a = 1 - 0.7 = 0.3, gap_v = 1 - 0.4 = 0.6, |0.3 - 0.6| / 3 * 2 = 0.2
    means = torch.tensor([0.7, 0.4], dtype=torch.float64)
    assert resample_share(means, 1.0, "linear") == pytest.approx(0.2)
    assert resample_share(means, 2.0, "linear") == pytest.approx(0.4)
    assert resample_share(means, 1.0, "tanh") == pytest.approx(0.1973753202)  # tanh(0.2)
    assert resample_share(means, 1.0, "square") == pytest.approx(0.0894427191)  # 0.2 ** 1.5
    # three modalities: max - min = 0.9 - 0.3 -> 0.4
    assert resample_share(torch.tensor([0.3, 0.9, 0.5]), 1.0) == pytest.approx(0.4)


# -- the epoch-level valuation and the steps ----------------------------------------------------------
def _trainer(config, seed=0):
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, seed=seed, eval_modality_scores=False, cost_steps=0)
    torch.manual_seed(seed)
    task = make_task("cls", 3)
    trainer = Trainer(tiny_model(seed=seed), SampleValuation(config), task, cfg, CPU, steps_per_epoch=3)
    loader = make_loader(splits["train"], cfg, CPU, train=True)

    def start(epoch):
        trainer.balancer.on_train_epoch_start(EpochContext(
            model=trainer.model, epoch=epoch, num_epochs=4, train_loader=loader,
            val_loader=make_loader(splits["val"], cfg, CPU, train=False), task=trainer.task, device=CPU,
            optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU)))

    return trainer, splits, loader, start


def _valuate(trainer, splits):
    loader = make_loader(splits["train"], trainer.cfg, CPU, train=False)
    return valuate(trainer.model, loader, "cls", lambda b: b, ("a", "b"))


def test_valuation_matches_the_official_two_modality_formula():
    trainer, splits, _, _ = _trainer(SampleValuationConfig())
    model, data = trainer.model, splits["train"].tensors
    phi = _valuate(trainer, splits)
    with torch.no_grad():  # official execute_modulation: value_all = 2, value_a = value_v = 1
        right = {d: (model(data, drop=d).prediction.argmax(1) == data["target"]).double()
                 for d in ((), ("b",), ("a",))}
    value_all, value_a, value_b = 2 * right[()], right[("b",)], right[("a",)]
    torch.testing.assert_close(phi[:, 0], (value_a + value_all - value_b) / 2)
    torch.testing.assert_close(phi[:, 1], (value_b + value_all - value_a) / 2)


def test_duplicates_join_the_steps_and_cover_the_plan_once_per_epoch():
    trainer, splits, loader, start = _trainer(SampleValuationConfig(warmup=0))
    bal, model = trainer.balancer, trainer.model
    start(0)
    phi = _valuate(trainer, splits)
    index, keep = sample_level_plan(phi)
    plan = Counter(zip(bal.rows.index.tolist(), bal.rows.keep.tolist(), strict=True))
    assert plan == Counter(zip(index.tolist(), keep.tolist(), strict=True)) and len(plan) > 0
    assert bal.rows.chunk == math.ceil(len(index) / 3)  # 48 samples, batch 16: 3 steps
    served: Counter = Counter()
    data = splits["train"].tensors
    for step, batch in enumerate(loader):
        window = slice(bal.rows.cursor * bal.rows.chunk, (bal.rows.cursor + 1) * bal.rows.chunk)
        rows, kept = bal.rows.index[window], bal.rows.keep[window]
        served.update(zip(rows.tolist(), kept.tolist(), strict=True))
        out = bal.forward_step(model, batch)
        terms = bal.loss_terms(out, batch, trainer.task)
        # each duplicate alone through the model with the other modality dropped (no BN / dropout here)
        dup = {k: v[rows] for k, v in data.items()}
        drops = [("b",) if k == 0 else ("a",) for k in kept.tolist()]
        pred = torch.cat([model({k: v[i:i + 1] for k, v in dup.items()}, drop=d).prediction
                          for i, d in enumerate(drops)])
        total = 16 + len(rows)
        ce_dup = F.cross_entropy(pred, dup["target"], reduction="sum")
        ce_batch = F.cross_entropy(model(batch).prediction, batch["target"], reduction="sum")
        torch.testing.assert_close(terms["resampled"], ce_dup / total)
        torch.testing.assert_close(terms["task"], ce_batch / total)
        assert step < 3
    assert served == plan  # every duplicate exactly once in the epoch's three steps
    stats = bal.diagnostics()
    assert stats["duplicates/a"] + stats["duplicates/b"] == len(index) and stats["valued_samples"] == 48


def test_modality_level_duplicates_keep_the_lowest_contribution():
    config = SampleValuationConfig(level="modality", warmup=0, part_ratio=0.5, alpha=3.0)
    trainer, _, _, start = _trainer(config)
    rng = torch.get_rng_state()
    start(0)
    assert torch.equal(rng, torch.get_rng_state())  # the valuation draws nothing from the main stream
    stats = trainer.balancer.diagnostics()
    phi = torch.tensor([stats["contribution/a"], stats["contribution/b"]], dtype=torch.float64)
    low = int(phi.argmin())
    assert stats["valued_samples"] == 24  # int(48 * 0.5), drawn with replacement
    assert len(trainer.balancer.rows) == int(resample_share(phi, 3.0) * 48)
    assert set(trainer.balancer.rows.keep.tolist()) <= {low}


@pytest.mark.parametrize("config", [
    SampleValuationConfig(level="modality", alpha=0.0, warmup=0),  # valued every epoch, nothing re-sampled
    SampleValuationConfig(warmup=5),  # all epochs inside the warm-up
])
def test_no_resampling_reproduces_joint_exactly(config):
    cfg = TrainConfig(epochs=3, batch_size=16, eval_modality_scores=False, cost_steps=0)
    result = assert_fits_like_joint(SampleValuation(config), cfg)
    valued = result.history[-1]["diagnostics"]["valued_samples"]
    assert valued == (3 * 9 if config.warmup == 0 else 0)  # int(48 * 0.2) = 9 per epoch


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_resume_inside_a_resampled_epoch(level):
    # the registry-wide resume test, with re-sampling from epoch 0 (the default warm-up never reaches it)
    options = {"warmup": 0, "level": level, "alpha": 2.0}
    assert check_state_round_trip("sample_valuation", "synthetic_cls2", options=options) is None


def test_config_errors_and_unsupported_task():
    bad = (("warmup", -1), ("part_ratio", 0.0), ("part_ratio", 1.5), ("alpha", -1.0), ("level", "batch"),
           ("func", "cubic"))
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            METHODS.build("sample_valuation", None, **{key: value})
    assert not METHODS.get("sample_valuation").supports(task="seg")
    with pytest.raises(UnsupportedError, match="sample_valuation"):
        short_fit("sample_valuation", "synthetic_seg4", samples=64)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3"])
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_fit_on_each_synthetic_task(dataset, level):
    result = short_fit("sample_valuation", dataset, samples=64, warmup=1, level=level, alpha=2.0)
    first, second = (h["diagnostics"] for h in result.history)
    assert first["valued_samples"] == 0 and second["valued_samples"] > 0
    modalities = result.trainer.model.modalities
    # efficiency: per sample the contributions sum to v(all) in {0, M}, so their means sum into [0, M]
    assert 0.0 <= sum(second[f"contribution/{m}"] for m in modalities) <= len(modalities) + 1e-9
    if any(second[f"duplicates/{m}"] for m in modalities):
        assert "resampled" in result.history[1]["terms"]
