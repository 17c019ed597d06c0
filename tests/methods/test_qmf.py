"""QMF: energy confidence, fusion and ranking loss by hand; the official history procedure; state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbalance.balancer import EpochContext
from mmbalance.datasets.base import TensorDictDataset
from mmbalance.errors import ConfigError, DataError
from mmbalance.methods import METHODS
from mmbalance.methods.qmf import (
    QMF,
    QMFConfig,
    energy_confidence,
    normalize_history,
    quality_fusion,
    ranking_loss,
)
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, make_loader

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
T = torch.tensor


def test_energy_confidence_and_fusion_by_hand():
    # logits (0, ln 3): logsumexp = ln 4 -> w = 0.1 ln 4; logits (ln 2, ln 2): w = 0.1 ln 4 too
    fa, fb = T([[0.0, math.log(3.0)]]), T([[math.log(2.0), math.log(2.0)]])
    wa, wb = energy_confidence(fa), energy_confidence(fb)
    assert wa.shape == (1, 1)
    assert wa.item() == pytest.approx(0.1 * math.log(4.0))
    assert wb.item() == pytest.approx(wa.item())  # same energy, different certainty: QMF weighs energy
    # a sharper, larger-energy prediction gets the larger weight: (0, 10) -> 0.1 * logsumexp = 1.0000454
    assert energy_confidence(T([[0.0, 10.0]])).item() == pytest.approx(0.1 * math.log(1 + math.exp(10.0)))
    fused = quality_fusion({"a": fa, "b": fb}, {"a": T([[0.5]]), "b": T([[2.0]])})
    expected = T([[0.5 * 0 + 2 * math.log(2.0), 0.5 * math.log(3.0) + 2 * math.log(2.0)]])
    torch.testing.assert_close(fused, expected)
    # segmentation logits (B, K, H, W): one weight per pixel
    assert energy_confidence(torch.zeros(2, 4, 3, 5)).shape == (2, 1, 3, 5)


def test_ranking_loss_by_hand():
    # w = (0.5, 0.2, 0.9), normalised losses c = (1, 0, 0.5); pairs (0,1), (1,2), (2,0):
    # (0,1): t = +1, margin 1  -> max(0, 0.5 - (0.2 + 1)) = 0
    # (1,2): t = -1, margin .5 -> max(0, -(0.2 - (0.9 - 0.5))) = 0.2
    #        (higher-loss sample 2 is more confident)
    # (2,0): t = -1, margin .5 -> max(0, -(0.9 - (0.5 - 0.5))) = 0
    loss = ranking_loss(T([0.5, 0.2, 0.9]), T([1.0, 0.0, 0.5]))
    assert loss.item() == pytest.approx(0.2 / 3)
    # equal histories give no ranking signal
    assert ranking_loss(T([0.1, 0.9]), T([0.3, 0.3])).item() == 0.0
    torch.testing.assert_close(normalize_history(T([2.0, 4.0]), T([0.0, 2.0, 4.0, 6.0])), T([1 / 3, 2 / 3]))
    torch.testing.assert_close(normalize_history(T([0.0, 0.0]), T([0.0, 0.0])), T([0.0, 0.0]))


def _official_rank_loss(conf: np.ndarray, idx: np.ndarray, correctness: np.ndarray) -> float:
    """The official History.get_target_margin + rank_loss, written out with numpy for comparison."""
    lo, hi = correctness.min(), correctness.max()
    c1 = (correctness[idx] - lo) / (hi - lo)
    c2 = (correctness[np.roll(idx, -1)] - lo) / (hi - lo)
    target = (c1 > c2).astype(float) - (c1 < c2).astype(float)
    margin = np.abs(c1 - c2)
    nonzero = np.where(target == 0, 1.0, target)
    x2 = np.roll(conf, -1) + margin / nonzero
    return float(np.mean(np.maximum(0.0, target * (conf - x2))))


def test_cumulative_history_matches_the_official_procedure():
    rng = np.random.default_rng(0)
    history = rng.random(20) * 3
    idx = rng.permutation(20)[:8]
    conf = rng.random(8)
    expected = _official_rank_loss(conf, idx, history)
    h = torch.from_numpy(history)
    got = ranking_loss(torch.from_numpy(conf), normalize_history(h[torch.from_numpy(idx)], h))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def _indexed_trainer(
    history: str = "cumulative", with_index: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
):
    splits, _ = tiny_splits()
    train = {k: v.to(dtype) if v.is_floating_point() else v for k, v in splits["train"].tensors.items()}
    if with_index:
        train["index"] = torch.arange(len(train["target"]))
    dataset = TensorDictDataset(train)
    task = make_task("cls", 3)
    cfg = TrainConfig(batch_size=16, seed=seed, cost_steps=0, eval_modality_scores=False)
    torch.manual_seed(seed)
    balancer = QMF(QMFConfig(history=history))
    trainer = Trainer(tiny_model(seed=seed).to(dtype), balancer, task, cfg, CPU, steps_per_epoch=3)
    loader = make_loader(dataset, cfg, CPU, train=False)
    ctx = EpochContext(trainer.model, 0, 1, loader, loader, task, CPU, trainer.optimizer, lambda b: b)
    balancer.on_train_epoch_start(ctx)
    return trainer, list(loader), task


def test_cumulative_history_sums_each_samples_loss_over_steps():
    trainer, batches, task = _indexed_trainer()
    balancer, first = trainer.balancer, batches[0]
    trainer.train_step(first, 0, 0)
    assert balancer.loss_history.shape == (2, 48)
    assert (balancer.loss_history[:, :16] > 0).all() and (balancer.loss_history[:, 16:] == 0).all()
    before = balancer.loss_history.clone()
    with torch.no_grad():  # the next step's per-sample losses, on the same weights
        logits = balancer.forward_step(trainer.model, first).extras["qmf.logits"]
        step_two = torch.stack(
            [task.loss(logits[m], first["target"], reduction="none").double() for m in ("a", "b")]
        )
    trainer.train_step(first, 0, 1)
    torch.testing.assert_close(balancer.loss_history[:, :16], before[:, :16] + step_two)



def test_float64_model_history_and_confidences_by_hand():
    """As the official numpy float64 History fed by the model's per-sample losses: on a float64
    model the history holds the float64 cross-entropies (a float32 cast is off by ~1e-8) and the
    confidence is 0.1 · logsumexp of the float64 logits."""
    trainer, batches, task = _indexed_trainer(dtype=torch.float64)
    balancer, first = trainer.balancer, batches[0]
    with torch.no_grad():  # the step's logits, on the weights before the step
        logits = balancer.forward_step(trainer.model, first).extras["qmf.logits"]
    target = first["target"]
    expected = torch.stack([F.cross_entropy(logits[m], target, reduction="none") for m in ("a", "b")])
    trainer.train_step(first, 0, 0)
    torch.testing.assert_close(balancer.loss_history[:, :16], expected, rtol=1e-12, atol=0)
    confidence = energy_confidence(logits["a"])
    assert confidence.dtype == torch.float64
    by_hand = 0.1 * torch.log(torch.exp(logits["a"]).sum(dim=1, keepdim=True))
    torch.testing.assert_close(confidence, by_hand, rtol=1e-12, atol=0)
    mean = balancer.diagnostics()["confidence/a"]
    assert mean == pytest.approx(confidence.mean().item(), rel=1e-12, abs=0)


def test_cumulative_history_needs_an_index_and_round_trips():
    trainer, batches, _ = _indexed_trainer(with_index=False)
    with pytest.raises(DataError, match="'index'"):
        trainer.train_step(batches[0], 0, 0)
    trainer, batches, _ = _indexed_trainer()
    trainer.train_step(batches[0], 0, 0)
    state = {k: v.clone() for k, v in trainer.balancer.state_dict().items()}
    fresh = QMF(QMFConfig(history="cumulative"))
    fresh.setup(tiny_model(), make_task("cls", 3), lambda p, lr=None, **kw: torch.optim.SGD(p, lr=0.1))
    fresh.load_state_dict(state)  # builds the heads and sizes the history from the saved state
    torch.testing.assert_close(fresh.loss_history, state["loss_history"])


def test_step_history_trains_and_predict_is_the_weighted_fusion():
    trainer, batches, task = _indexed_trainer(history="step", with_index=False)
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
    trainer.flush_terms()
    model, balancer = trainer.model, trainer.balancer
    model.eval()
    with torch.no_grad():
        features, _ = model.encode(batches[0])
        logits = balancer.heads(features)
        weights = {m: 0.1 * torch.logsumexp(logits[m], dim=1, keepdim=True) for m in ("a", "b")}
        expected = weights["a"] * logits["a"] + weights["b"] * logits["b"]
        torch.testing.assert_close(balancer.predict(model.fuse(features)), expected)
    assert set(balancer.diagnostics()) == {"confidence/a", "confidence/b"}


def test_config_errors_and_unsupported_regression():
    with pytest.raises(ConfigError, match="history"):
        METHODS.build("qmf", None, history="epoch")
    with pytest.raises(ConfigError, match="lam"):
        METHODS.build("qmf", None, lam=-1.0)
    assert not QMF.supports(task="reg")
