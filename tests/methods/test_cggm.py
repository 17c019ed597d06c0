"""CGGM: hand-computed formulas (reference cggm.md §8.4), the official stale direction term, the
paper-mode closed form against autograd, the step contract (one backward, no host sync, one fused
scaling per modality, heads through the scaler), exact memory, diagnostics and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.measure import persistent_state_bytes
from mmbalance.methods import METHODS
from mmbalance.methods._cggm_formulas import (
    direction_loss,
    interpolation_matrix,
    last_layer_gradient,
    magnitude_coefficients,
    output_gradient,
)
from mmbalance.methods.cggm import CGGM, CGGMConfig
from mmbalance.tasks import ClassificationTask, RegressionTask, SegmentationTask, make_task
from mmbalance.train import TrainConfig, Trainer
from tests.conftest import tiny_model, tiny_splits
from tests.methods._helpers import assert_same_parameters, train_steps

CPU = torch.device("cpu")
F64 = torch.float64


# -- helpers -------------------------------------------------------------------------------------
def make_trainer(seed=0, n=32, batch=16, scaler=None, trace=False, **overrides):
    overrides.setdefault("head_dropout", 0.0)
    torch.manual_seed(seed)
    model = tiny_model(seed=seed)
    splits, _ = tiny_splits(n=n, seed=seed)
    task = make_task("cls", 3)
    balancer = CGGM(METHODS.resolve_config("cggm", None, overrides), trace=trace)
    trainer = Trainer(model, balancer, task, TrainConfig(batch_size=batch, seed=seed), CPU)
    if scaler is not None:
        trainer.scaler = scaler
    data = splits["train"].tensors
    batches = [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, n, batch)]
    return trainer, batches


def capture_grads(balancer, store):
    """Wrap on_after_backward: record every model gradient before and after the hook."""
    original = balancer.on_after_backward

    def spy(ctx):
        store["before"] = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
        heads = balancer.heads
        store["heads"] = {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}
        store["head_weights"] = [heads[m].out_layer.weight.detach().clone() for m in balancer.modalities]
        store["fusion_weight"] = ctx.model.out_layer.weight.detach().clone()  # before this step's update
        store["output"] = ctx.output
        store["batch"] = ctx.batch
        original(ctx)
        store["after"] = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}

    balancer.on_after_backward = spy


# -- §8.4 (a), (b): the magnitude term -----------------------------------------------------------
def test_magnitude_hand_example_three_modalities():
    c, raw = magnitude_coefficients(torch.tensor([0.1, 0.05, 0.05], dtype=F64))
    assert torch.allclose(c, torch.tensor([0.5, 0.75, 0.75], dtype=F64), atol=1e-7)
    assert torch.equal(c, raw)
    rho = 1.3
    assert torch.allclose(rho * c, torch.tensor([0.65, 0.975, 0.975], dtype=F64), atol=1e-7)
    assert math.isclose(float((rho * c).sum()), 2 * rho, rel_tol=1e-7)  # Σ B = ρ (M - 1)


def test_magnitude_hand_example_zeroes_fast_modality():
    c, _ = magnitude_coefficients(torch.tensor([0.2, 0.0], dtype=F64))
    assert torch.allclose(c, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-7)


def test_magnitude_official_blow_up_when_sum_is_zero():
    # reference §2: batch 64, M = 3, diffs (+1/64, -1/64, 0) -> coeff ≈ (-1.5625e6, +1.5625e6, 1)
    c, _ = magnitude_coefficients(torch.tensor([1 / 64, -1 / 64, 0.0], dtype=F64))
    assert torch.allclose(c, torch.tensor([-1.5625e6, 1.5625e6, 1.0], dtype=F64), rtol=1e-6)


def test_stabilize_neutral_below_resolution_and_simplex_otherwise():
    delta = torch.tensor([1 / 64, -1 / 64, 0.0], dtype=F64)
    c, raw = magnitude_coefficients(delta, stabilize=True, resolution=1 / 64)
    assert torch.allclose(c, torch.full((3,), 2 / 3, dtype=F64))
    assert raw.abs().max() > 1e6
    # S = 0.3 >= 1/64: raw (-2/3, 5/3) -> clamp (0, 5/3) -> rescale to Σ = M - 1 = 1 -> (0, 1)
    c, _ = magnitude_coefficients(torch.tensor([0.5, -0.2], dtype=F64), stabilize=True, resolution=1 / 64)
    assert torch.allclose(c, torch.tensor([0.0, 1.0], dtype=F64))
    # a regular case is untouched: (0.1, 0.05, 0.05) -> (0.5, 0.75, 0.75)
    regular = torch.tensor([0.1, 0.05, 0.05], dtype=F64)
    c, _ = magnitude_coefficients(regular, stabilize=True, resolution=1 / 64)
    assert torch.allclose(c, torch.tensor([0.5, 0.75, 0.75], dtype=F64), atol=1e-7)


def test_stabilize_bounds_hold_on_quantized_random_improvements():
    g = torch.Generator().manual_seed(0)
    for m in (2, 3, 4):
        for _ in range(200):
            delta = torch.randint(-8, 9, (m,), generator=g).double() / 64
            c, _ = magnitude_coefficients(delta, stabilize=True, resolution=1 / 64)
            assert (c >= 0).all() and (c <= m - 1 + 1e-9).all()
            assert math.isclose(float(c.sum()), m - 1, rel_tol=1e-9)


# -- §8.4 (c): L_gm values -----------------------------------------------------------------------
def test_direction_loss_hand_values():
    c = torch.tensor([0.5, 0.75, 0.75])
    assert float(direction_loss(c, torch.ones(3))) == pytest.approx(0.0, abs=1e-7)
    c = torch.tensor([-1.5, 2.0, 1.5])
    assert float(direction_loss(c, torch.zeros(3))) == pytest.approx(5 / 3)
    # |c| - c cos with cos = -1 doubles: (2 * 5) / 3
    assert float(direction_loss(c.abs(), -torch.ones(3))) == pytest.approx(10 / 3)


# -- §8.4 (d): official direction term, one step stale, only into W_F -----------------------------
def test_official_stale_gradient_reaches_only_fusion_weight_at_previous_values():
    lam = 0.5
    trainer, batches = make_trainer(lam=lam, direction="official", magnitude=False)
    wf0 = trainer.model.out_layer.weight.detach().clone()
    store0: dict = {}
    capture_grads(trainer.balancer, store0)
    trainer.train_step(batches[0], 0, 0)
    heads0 = store0["head_weights"]  # step-0 values, before the heads' own update
    c0 = trainer.balancer._B.clone() / trainer.balancer.config.rho
    store1: dict = {}
    capture_grads(trainer.balancer, store1)
    trainer.train_step(batches[1], 0, 1)

    ref, _ = make_trainer(lam=0.0, direction="official", magnitude=False)
    ref_store: dict = {}
    capture_grads(ref.balancer, ref_store)
    ref.train_step(batches[0], 0, 0)
    ref.train_step(batches[1], 0, 1)

    diff = {n: store1["before"][n] - ref_store["before"][n] for n in store1["before"]}
    changed = sorted(n for n, d in diff.items() if d.abs().max() > 0)
    assert changed == ["head.out_layer.weight"], changed
    # hand value: λ ∂/∂W_F (1/M) Σ (|c| - c cos(W_i^0, W_F)) at the step-0 value W_F^0
    def hand_gradient(w_fusion, head_weights):
        w = w_fusion.clone().requires_grad_(True)
        cos = torch.stack([F.cosine_similarity(h.flatten(), w.flatten(), dim=0) for h in head_weights])
        (lam * direction_loss(c0, cos)).backward()
        return w.grad

    assert torch.allclose(diff["head.out_layer.weight"], hand_gradient(wf0, heads0), atol=1e-7)
    # ... and not the same expression at the step-1 weights (the one-step staleness is real)
    current = hand_gradient(store1["fusion_weight"], store1["head_weights"])
    assert not torch.allclose(diff["head.out_layer.weight"], current, atol=1e-7)
    # the heads never receive the direction term
    assert all(torch.equal(store1["heads"][n], ref_store["heads"][n]) for n in store1["heads"])


def test_official_first_step_has_zero_direction_term():
    trainer, batches = make_trainer(lam=0.2)
    store: dict = {}
    original = trainer.balancer.loss_terms

    def spy(output, batch, task):
        terms = original(output, batch, task)
        store.setdefault("gm", []).append(terms["gm"].detach().clone())
        store.setdefault("graph", []).append(terms["gm"].requires_grad)
        return terms

    trainer.balancer.loss_terms = spy
    trainer.train_step(batches[0], 0, 0)
    trainer.train_step(batches[1], 0, 1)
    assert float(store["gm"][0]) == 0.0 and not store["graph"][0]
    assert store["graph"][1] and float(store["gm"][1]) > 0


# -- paper mode: closed-form last-layer gradients equal autograd's ---------------------------------
def _autograd_last_layer(task, hidden, weight, bias, target, upsample=None):
    w = weight.clone().requires_grad_(True)
    if hidden.dim() == 2:
        z = hidden @ w.T + bias
    else:
        z = F.conv2d(hidden, w[:, :, None, None], bias)
        if upsample is not None:
            z = F.interpolate(z, size=upsample[0], mode="bilinear", align_corners=upsample[1])
    if isinstance(task, RegressionTask):
        z = z.reshape(-1, 1)
    task.loss(z, target).backward()
    align_corners = None if upsample is None else upsample[1]
    output_grad = output_gradient(task, z.detach(), target)
    closed = last_layer_gradient(output_grad, hidden, align_corners=align_corners)
    return closed, w.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_closed_form_classification(smoothing):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    b = torch.randn(4, dtype=F64)
    y = torch.randint(0, 4, (7,), generator=g)
    closed, auto = _autograd_last_layer(ClassificationTask(4, label_smoothing=smoothing), h, w, b, y)
    assert torch.allclose(closed, auto, atol=1e-12)


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_closed_form_regression(loss):
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(9, 6, generator=g, dtype=F64), torch.randn(1, 6, generator=g, dtype=F64)
    b = torch.randn(1, dtype=F64)
    y = torch.randn(9, generator=g, dtype=F64)
    closed, auto = _autograd_last_layer(RegressionTask(loss=loss), h, w, b, y)
    assert torch.allclose(closed, auto, atol=1e-12)


@pytest.mark.parametrize("upsample", [None, ((8, 10), True), ((8, 10), False)])
@pytest.mark.parametrize("weights", [(0.2, 0.3, 0.25, 0.25), None])
def test_closed_form_segmentation_full_loss(upsample, weights):
    g = torch.Generator().manual_seed(3)
    small = (4, 5) if upsample else (8, 10)
    h = torch.randn(2, 3, *small, generator=g, dtype=F64)
    w, b = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, dtype=F64)
    y = torch.randint(0, 4, (2, 8, 10), generator=g)
    task = SegmentationTask(class_weights=weights)
    closed, auto = _autograd_last_layer(task, h, w, b, y, upsample)
    assert torch.allclose(closed, auto, atol=1e-12)


def test_interpolation_matrix_is_separable_bilinear():
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    for ac in (True, False):
        a_h = interpolation_matrix(4, 9, align_corners=ac, device=CPU, dtype=F64)
        a_w = interpolation_matrix(5, 7, align_corners=ac, device=CPU, dtype=F64)
        ours = torch.einsum("Hh,bchw,Ww->bcHW", a_h, x, a_w)
        expected = F.interpolate(x, size=(9, 7), mode="bilinear", align_corners=ac)
        assert torch.allclose(ours, expected, atol=1e-12)


def test_paper_mode_direction_reaches_encoders_not_heads_without_autograd_grad(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.autograd.grad must not be called")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    stores = {}
    for lam in (0.5, 0.0):
        trainer, batches = make_trainer(lam=lam, direction="paper", magnitude=False)
        store: dict = {}
        capture_grads(trainer.balancer, store)
        trainer.train_step(batches[0], 0, 0)
        stores[lam] = store
    with_gm, without = stores[0.5], stores[0.0]
    enc = [n for n in with_gm["before"] if n.startswith("encoders.")]
    assert any(not torch.equal(with_gm["before"][n], without["before"][n]) for n in enc)
    assert all(torch.equal(with_gm["heads"][n], without["heads"][n]) for n in with_gm["heads"])


# -- the step contract -----------------------------------------------------------------------------
def test_magnitude_scales_encoder_grads_by_B_from_head_accuracy():
    trainer, batches = make_trainer(rho=1.3)
    b = trainer.balancer
    store: dict = {}
    capture_grads(b, store)
    trainer.train_step(batches[0], 0, 0)
    # ε from the heads before their update; ε^0 = 0 so Δε = ε
    store2: dict = {}
    capture_grads(b, store2)
    heads_before = {m: [p.detach().clone() for p in b.heads[m].parameters()] for m in b.modalities}
    eps_prev = b.eps_prev.clone()
    assert torch.all(eps_prev >= 0) and torch.all(eps_prev <= 1)

    def expected_B(output, batch, heads_params):
        eps = []
        for m, params in zip(b.modalities, heads_params, strict=True):
            head = b.heads[m]
            saved = [p.detach().clone() for p in head.parameters()]
            with torch.no_grad():
                for p, v in zip(head.parameters(), params, strict=True):
                    p.copy_(v)
                z, _ = head(output.features[m].detach())
                for p, v in zip(head.parameters(), saved, strict=True):
                    p.copy_(v)
            eps.append((z.argmax(1) == batch["target"]).double().mean())
        eps = torch.stack(eps)
        c, _ = magnitude_coefficients(eps - eps_prev.double())
        return 1.3 * c

    trainer.train_step(batches[1], 0, 1)
    expected = expected_B(store2["output"], store2["batch"], [heads_before[m] for m in b.modalities])
    for i, m in enumerate(b.modalities):
        for n in store2["before"]:
            before, after = store2["before"][n], store2["after"][n]
            if n.startswith(f"encoders.{m}."):
                assert torch.allclose(after.double(), before.double() * expected[i], rtol=1e-5, atol=1e-9), n
            elif not n.startswith("encoders."):
                assert torch.equal(after, before), n


@pytest.mark.parametrize("trace", [False, True])
def test_one_backward_one_fused_scaling_per_modality_and_no_host_sync(monkeypatch, trace):
    trainer, batches = make_trainer(direction="official", trace=trace)
    trainer.train_step(batches[0], 0, 0)  # first step: builds heads, runs its one-off checks
    b = trainer.balancer
    counts = {"backward": 0, "foreach_mul": 0}
    active = {"on": False}
    real_backward, real_mul = torch.Tensor.backward, torch._foreach_mul_

    def count_backward(self, *a, **k):
        counts["backward"] += 1
        return real_backward(self, *a, **k)

    def count_mul(*a, **k):
        counts["foreach_mul"] += active.get("after_backward", False)  # Adam(foreach) also calls it
        return real_mul(*a, **k)

    def sync_guard(name):
        real = getattr(torch.Tensor, name)

        def guarded(self, *a, **k):
            if active["on"]:
                raise AssertionError(f"host synchronisation (Tensor.{name}) in a CGGM hook")
            return real(self, *a, **k)

        return guarded

    def in_hook(fn, on=True):
        def wrapped(*a, **k):
            before, active["on"] = active["on"], on
            try:
                return fn(*a, **k)
            finally:
                active["on"] = before

        return wrapped

    monkeypatch.setattr(torch.Tensor, "backward", count_backward)
    monkeypatch.setattr(torch, "_foreach_mul_", count_mul)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, sync_guard(name))
    for hook in ("loss_terms", "on_after_backward", "on_after_optimizer_step"):
        setattr(b, hook, in_hook(getattr(b, hook)))
    scaled = b.on_after_backward

    def after_backward(ctx):
        active["after_backward"] = True
        try:
            scaled(ctx)
        finally:
            active["after_backward"] = False

    b.on_after_backward = after_backward
    # Adam reads its CPU step counter with .item(): torch's own, not a device sync.
    b.heads.optimizer.step = in_hook(b.heads.optimizer.step, on=False)
    trainer.train_step(batches[1], 0, 1)
    trainer.train_step(batches[0], 0, 2)
    monkeypatch.undo()
    assert counts == {"backward": 2, "foreach_mul": 2 * len(trainer.model.modalities)}
    assert len(b.trace_records) == (3 if trace else 0)


def test_magnitude_false_leaves_encoder_grads():
    trainer, batches = make_trainer(magnitude=False)
    store: dict = {}
    capture_grads(trainer.balancer, store)
    trainer.train_step(batches[0], 0, 0)
    assert all(torch.equal(store["before"][n], store["after"][n]) for n in store["before"])


def test_heads_step_through_the_grad_scaler_and_are_zeroed():
    final = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)):
        trainer, batches = make_trainer(scaler=scaler)
        trainer.train_step(batches[0], 0, 0)
        trainer.train_step(batches[1], 0, 1)
        assert all(p.grad is None for p in trainer.balancer.heads.parameters())
        final.append([p.detach().clone() for p in trainer.balancer.heads.parameters()])
    for a, b in zip(*final, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_heads_absent_from_inference_and_train_on_detached_features():
    trainer, batches = make_trainer()
    trainer.train_step(batches[0], 0, 0)
    b = trainer.balancer
    assert b.inference_state_dict() == {}
    assert any(k.startswith("heads.") for k in b.state_dict())
    out = trainer.model(batches[0])
    assert b.predict(out) is out.prediction
    # the head loss alone gives no encoder gradient
    trainer.model.zero_grad(set_to_none=True)
    out = trainer.model(batches[0])
    z, _ = b.heads["a"](out.features["a"].detach())
    F.cross_entropy(z, batches[0]["target"]).backward()
    assert all(p.grad is None for p in trainer.model.parameters())


def test_eps_starts_at_zero_and_persists_across_epochs():
    trainer, batches = make_trainer()
    b = trainer.balancer
    assert torch.equal(b.eps_prev, torch.zeros(2))
    trainer.train_step(batches[0], 0, 0)
    after = b.eps_prev.clone()
    b.on_train_epoch_start(None)  # a new epoch does not reset ε
    assert torch.equal(b.eps_prev, after)


def test_persistent_memory_is_exact():
    trainer, batches = make_trainer()
    store: dict = {}
    capture_grads(trainer.balancer, store)
    trainer.train_step(batches[0], 0, 0)
    b = trainer.balancer
    # tiny model: features (B, 8), out_layer Linear(8, 3); a vector head = 2 x Linear(8, 8) + Linear(8, 3)
    per_head_params = 2 * (8 * 8 + 8) + (8 * 3 + 3)
    per_head_tensors = 6
    m = 2
    params = m * per_head_params
    adam_state = 2 * params * 4 + m * per_head_tensors * 4  # exp_avg, exp_avg_sq (fp32) + fp32 `step`
    # ε^{t-1} in float64; the official direction's stored inputs of the previous L_gm: W_F and the
    # M head weights (3 x 8 each, fp32) and M float64 coefficients (diagnostics are not module state)
    buffers = m * 8 + (m + 1) * 3 * 8 * 4 + m * 8
    assert sum(p.numel() for p in b.heads.parameters()) == params
    grads = params * 4  # a gradient per trainable head parameter: every backward allocates it
    assert persistent_state_bytes(b, b.auxiliary_optimizers()) == params * 4 + grads + adam_state + buffers
    # during the step the head gradients exist: exactly the parameters' size
    assert sum(g.numel() * g.element_size() for g in store["heads"].values()) == params * 4


def test_diagnostics_are_epoch_means_and_reset():
    trainer, batches = make_trainer(direction="official")
    b = trainer.balancer
    eps = []
    for i, batch in enumerate(batches * 2):
        trainer.train_step(batch, 0, i)
        eps.append(b.eps_prev.clone())
    d = b.diagnostics()
    mean = torch.stack(eps).mean(0)
    for i, m in enumerate(b.modalities):
        assert d[f"eps/{m}"] == pytest.approx(float(mean[i]), abs=1e-6)
        for key in ("B", "cos", "grad_cos", "grad_norm", "B_min", "B_max"):
            assert math.isfinite(d[f"{key}/{m}"])
        assert d[f"B_min/{m}"] <= d[f"B/{m}"] <= d[f"B_max/{m}"]
    assert d["L_gm"] >= 0 and 0 <= d["frac_small_sum"] <= 1 and 0 <= d["frac_negative_B"] <= 1
    assert b.diagnostics() == {}


def test_direction_none_drops_direction_diagnostics_and_term():
    trainer, batches = make_trainer(direction=None)
    trainer.train_step(batches[0], 0, 0)
    d = trainer.balancer.diagnostics()
    assert "L_gm" not in d and "cos/a" not in d and "grad_cos/a" in d


# -- configuration and bad input -----------------------------------------------------------------
def test_config_resolution_of_direction_options():
    assert CGGMConfig().rho_in_direction is False
    assert CGGMConfig(direction="paper").rho_in_direction is True
    assert CGGMConfig(direction="paper", rho_in_direction=False).rho_in_direction is False
    assert CGGMConfig(direction="none").direction is None
    assert METHODS.resolve_config("cggm", "brats").rho == 1.0
    assert METHODS.resolve_config("cggm", "food101").cls_weight_decay == 3e-3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -1.0}, "rho"),
        ({"lam": -0.1}, "lam"),
        ({"direction": "gradients"}, "direction"),
        ({"eps_metric": "auc"}, "eps_metric"),
        ({"cls_lr": 0.0}, "cls_lr"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        METHODS.build("cggm", None, **overrides)


def test_empty_modality_group_is_an_error():
    model = tiny_model()
    original = model.modality_parameters
    model.modality_parameters = lambda m: [] if m == "b" else original(m)
    with pytest.raises(ConfigError, match="'b'"):
        CGGM().setup(model, make_task("cls", 3), lambda params, **k: torch.optim.Adam(params))


def test_encoder_without_parameters_is_an_error():
    model = tiny_model()
    for p in model.encoders["a"].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="'a'"):
        CGGM().setup(model, make_task("cls", 3), lambda params, **k: torch.optim.Adam(params))


class _VectorScoreTask(ClassificationTask):
    def score(self, prediction, target):  # per-class accuracies: cannot give one ε
        return (prediction.argmax(1)[:, None] == torch.arange(self.num_outputs)).float().mean(0)


def test_task_whose_metric_cannot_give_eps():
    _, batches = make_trainer()
    trainer = Trainer(tiny_model(), CGGM(), _VectorScoreTask(3), TrainConfig(batch_size=16), CPU)
    with pytest.raises(UnsupportedError, match="task.score"):  # a score without `exact`: called plainly
        trainer.train_step(batches[0], 0, 0)


def test_neg_mae_needs_regression_and_unknown_task_rejected():
    with pytest.raises(UnsupportedError, match="eps_metric"):
        CGGM(CGGMConfig(eps_metric="neg_mae")).setup(tiny_model(), make_task("cls", 3), None)

    class OddTask(ClassificationTask):
        name = "rank"

    with pytest.raises(UnsupportedError, match="'rank'"):
        CGGM().setup(tiny_model(), OddTask(3), None)


def test_one_modality_is_unsupported():
    model = tiny_model(dims=(("a", 4),))
    with pytest.raises(UnsupportedError, match="2 modalities"):
        CGGM().setup(model, make_task("cls", 3), None)


def test_observer_mode_trains_exactly_like_joint():
    # magnitude off, no direction term, no head dropout: the heads only observe (Fig. 2 setting)
    from mmbalance.methods.joint import Joint

    trainer, batches = make_trainer(magnitude=False, direction=None, head_dropout=0.0)
    torch.manual_seed(0)
    joint = Trainer(tiny_model(seed=0), Joint(), make_task("cls", 3), TrainConfig(batch_size=16, seed=0), CPU)
    train_steps(batches * 2, 0, trainer, joint)
    assert_same_parameters(trainer.model, joint.model)
    assert trainer.balancer.diagnostics()["grad_norm/a"] > 0


@pytest.mark.parametrize("every, calls", [(3, 3), (1, 7), (0, 0)])
def test_grad_cos_diagnostic_is_sampled(every, calls):
    trainer, batches = make_trainer(direction="official", grad_cos_every=every)
    b = trainer.balancer
    original, seen = b._cosines, []

    def counting(*a, **k):
        seen.append(1)
        return original(*a, **k)

    b._cosines = counting
    for i in range(7):
        trainer.train_step(batches[i % 2], 0, i)
    d = b.diagnostics()
    assert len(seen) == calls
    assert ("grad_cos/a" in d) == (calls > 0)
