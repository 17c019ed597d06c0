"""G-Blending: the OGR weight arithmetic by hand, the joint-neutral fixed setting, isolated estimation."""

from __future__ import annotations

import pytest
import torch

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.g_blending import FUSION, GBlending, GBlendingConfig, gblend_weights
from mmbalance.methods.joint import Joint
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

from ..conftest import tiny_model, tiny_splits
from ._helpers import fit_tiny, float64_problem

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


def test_delta_weights_by_hand():
    # candidates a, b, fusion; (L^T_n, L^V_n, L^T_{n+N}, L^V_{n+N})
    # a: G = 1.1 - 0.8 = 0.3,   O = (0.8 - 0.5) - (1.1 - 1.0) = 0.2,  w = 0.3 / 0.04 = 7.5
    # b: G = 1.0 - 0.95 = 0.05, O = (0.95 - 0.9) - (1.0 - 1.0) = 0.05, w = 0.05 / 0.0025 = 20
    # f: G = 1.05 - 0.9 = 0.15, O = (0.9 - 0.3) - (1.05 - 1.0) = 0.55, w = 0.15 / 0.3025
    weights, gains, overfits = gblend_weights(
        [1.0, 1.0, 1.0], [1.1, 1.0, 1.05], [0.5, 0.9, 0.3], [0.8, 0.95, 0.9], estimator="delta"
    )
    raw = [7.5, 20.0, 0.15 / 0.3025]
    z = sum(raw)
    assert weights == pytest.approx([r / z for r in raw], rel=1e-9)
    assert weights == pytest.approx([0.267897, 0.714391, 0.017712], abs=1e-6)
    assert gains == pytest.approx([0.3, 0.05, 0.15])
    assert overfits == pytest.approx([0.2, 0.05, 0.55])


def test_negative_gain_gets_zero_weight_and_all_negative_is_degenerate():
    # b's validation loss rose (G = -0.1): weight 0, not |G|/O^2 as the re-implementations' abs() gives
    weights, _, _ = gblend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.8, 1.1])
    # a: G = 0.2, O = 0.3 - 0 = 0.3 -> 0.2 / 0.09; b: 0
    assert weights == pytest.approx([1.0, 0.0])
    weights, gains, _ = gblend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [1.2, 1.1])
    assert weights is None and gains == pytest.approx([-0.2, -0.1])


def test_final_estimator_and_overfit_floor():
    # MultiBench delta=False: G = L^V_{n+N}, O = max(L^V_{n+N} - L^T_{n+N}, 1e-4)
    # a: 0.8 / 0.3^2 = 8.888..; b: O = 0.9 - 0.95 < 0 -> floor 1e-4: 0.9 / 1e-8 = 9e7
    weights, _, overfits = gblend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.95], [0.8, 0.9], estimator="final")
    z = 0.8 / 0.09 + 0.9 / 1e-8
    assert weights == pytest.approx([0.8 / 0.09 / z, 0.9 / 1e-8 / z], rel=1e-9)
    assert overfits == pytest.approx([0.3, -0.05])
    with pytest.raises(ConfigError, match="one loss per candidate"):
        gblend_weights([1.0], [1.0, 2.0], [1.0], [1.0])


def test_fixed_fusion_only_weights_reproduce_joint_exactly():
    joint, _ = fit_tiny(Joint(), CFG)
    fusion_only = GBlendingConfig(mode="fixed", weights={"a": 0.0, "b": 0.0, FUSION: 1.0})
    blend, _ = fit_tiny(GBlending(fusion_only), CFG)
    for (k, v), (k2, v2) in zip(joint.state_dict().items(), blend.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def _ctx(model, trainer, splits, val_dataset=None):
    train_loader = make_loader(splits["train"], CFG, CPU, train=True)
    val_loader = make_loader(val_dataset or splits["val"], CFG, CPU, train=False)
    return EpochContext(
        model=model, epoch=0, num_epochs=2, train_loader=train_loader, val_loader=val_loader,
        task=trainer.task, device=CPU, optimizer=trainer.optimizer,
        to_device=lambda b: batch_to_device(b, CPU),
    )


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_online_estimate_uses_validation_counts_steps_and_leaves_the_main_rng_alone():
    splits, spec = tiny_splits()
    model = tiny_model()
    balancer = GBlending(GBlendingConfig(super_epoch=2, estimate_epochs=2))
    trainer = Trainer(model, balancer, make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    val = CountingDataset(splits["val"])
    ctx = _ctx(model, trainer, splits, val)
    before_params = [p.detach().clone() for p in model.parameters()]
    rng, loader_rng = torch.get_rng_state(), ctx.train_loader.generator.get_state()
    balancer.on_train_epoch_start(ctx)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(loader_rng, ctx.train_loader.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters(), strict=True))
    assert val.reads == 3 * 2 * 48  # 3 candidates x (before, after) x 48 validation samples
    assert balancer.extra_steps() == 3 * 2 * 3  # candidates x N epochs x 3 batches
    w = balancer.blend_weights.tolist()
    assert sum(w) == pytest.approx(1.0) and all(x >= 0 for x in w)
    assert int(balancer.estimates) == 1
    ctx_1 = EpochContext(**{**ctx.__dict__, "epoch": 1})
    balancer.on_train_epoch_start(ctx_1)  # not a super-epoch boundary
    assert int(balancer.estimates) == 1
    diag = balancer.diagnostics()
    assert set(diag) >= {"w/a", "w/b", "w/fusion", "gain/a", "overfit/fusion"}


def test_config_and_setup_errors():
    with pytest.raises(ConfigError, match="mode must be one of"):
        METHODS.build("g_blending", None, mode="sometimes")
    with pytest.raises(ConfigError, match="only used with mode='fixed'"):
        METHODS.build("g_blending", None, weights={"a": 1.0})
    with pytest.raises(ConfigError, match="weights\\['a'\\] must be a finite number >= 0"):
        METHODS.build("g_blending", None, mode="fixed", weights={"a": -1.0})
    balancer = GBlending(GBlendingConfig(mode="fixed", weights={"a": 1.0, "c": 1.0}))
    with pytest.raises(ConfigError, match="unknown \\['c'\\], missing \\['b', 'fusion'\\]"):
        balancer.setup(tiny_model(), make_task("cls", 3), lambda p, lr=None: torch.optim.SGD(p, lr=0.1))


def test_estimated_weights_are_kept_in_float64_by_hand(monkeypatch):
    """The estimate's weights are the re-implementations' Python floats: with the losses of
    test_delta_weights_by_hand, raw w = (7.5, 20, 0.15 / 0.55² = 60/121), sum 3387.5/121, so
    w = (7.5·121, 20·121, 60) / 3387.5 = (363, 968, 24) / 1355 exactly (a float32 buffer is off by
    ~1e-8)."""
    model, splits, _ = float64_problem()
    balancer = GBlending(GBlendingConfig(super_epoch=2, estimate_epochs=1))
    trainer = Trainer(model, balancer, make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    scripted = iter([(1.0, 1.1, 0.5, 0.8), (1.0, 1.0, 0.9, 0.95), (1.0, 1.05, 0.3, 0.9)])
    monkeypatch.setattr(balancer, "_measure", lambda *args: next(scripted))
    balancer.on_train_epoch_start(_ctx(model, trainer, splits))
    expected = [363 / 1355, 968 / 1355, 24 / 1355]
    assert balancer.blend_weights.dtype == torch.float64
    for got, want in zip(balancer.blend_weights.tolist(), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert balancer.diagnostics()["w/b"] == pytest.approx(968 / 1355, rel=1e-12, abs=0)


def test_each_weight_scales_its_loss_in_the_loss_dtype():
    """float64 model: term = w · L exactly as the Python float w times a float64 loss; float32 model:
    the float32-rounded w times the float32 loss (the re-implementations' `w * criterion(...)`)."""
    weights = {"a": 0.1, "b": 0.2, FUSION: 0.7}  # none of them is a float32 number
    task = make_task("cls", 3)
    for dtype in (torch.float64, torch.float32):
        model, splits, _ = float64_problem()
        model = model.to(dtype)
        balancer = GBlending(GBlendingConfig(mode="fixed", weights=weights))
        Trainer(model, balancer, task, CFG, CPU, steps_per_epoch=3)
        batch = {k: v[:16].to(dtype) if v.is_floating_point() else v[:16]
                 for k, v in splits["train"].tensors.items()}
        output = model(batch)
        terms = balancer.loss_terms(output, batch, task)
        with torch.no_grad():
            head_a = balancer.heads.heads["a"](output.features["a"])
            loss_a = task.loss(head_a, batch["target"])
            loss_f = task.loss(output.prediction, batch["target"])
        assert terms["unimodal/a"].dtype == dtype
        if dtype == torch.float64:
            assert terms["unimodal/a"].item() == pytest.approx(0.1 * loss_a.item(), rel=1e-12, abs=0)
            assert terms["task"].item() == pytest.approx(0.7 * loss_f.item(), rel=1e-12, abs=0)
        else:
            rounded = torch.tensor(0.1, dtype=torch.float32)
            assert torch.equal(terms["unimodal/a"].detach(), rounded * loss_a)
