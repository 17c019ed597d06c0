"""CML: the regulariser and the removal chain by hand, the chain's zeroed features, joint outside the window,
the private generator, config errors, short runs on every declared synthetic task."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.cml import CML, CMLConfig, calibration_penalty, removal_masks
from mmbalance.models.base import ModelOutput
from mmbalance.tasks import make_task

from ..conftest import tiny_model
from ._helpers import assert_same_parameters, joint_and, short_fit, tiny_trainer, train_steps

CPU = torch.device("cpu")
LN3, LN4, LN9 = math.log(3.0), math.log(4.0), math.log(9.0)
# softmax: (ln 3, 0) -> (0.75, 0.25); (ln 4, 0) -> (0.8, 0.2); (ln 9, 0) -> (0.9, 0.1); (0, 0) -> (0.5, 0.5)
FULL = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN4, 0.0]])
SUBSET = torch.tensor([[LN4, 0.0], [0.0, LN4], [LN3, 0.0]])
SINGLE = torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN9, 0.0]])
Y = torch.tensor([0, 0, 0])


def test_regulariser_by_hand():
    # pos 0: full right (pred 0, c 0.75), subset c 0.8 -> trick 1: relu(0.8 - 0.75) = 0.05
    # pos 1: full wrong (pred 1, c 0.75), subset wrong (pred 1, c 0.8) -> trick 2: relu(0.8 - 0.75) = 0.05
    # pos 2: full right (c 0.8), subset less confident (c 0.75) -> relu(-0.05) = 0
    torch.testing.assert_close(calibration_penalty([FULL, SUBSET], Y), torch.tensor([0.05, 0.05, 0.0]))
    # tolerance margin: relu(0.05 - 0.02) = 0.03
    torch.testing.assert_close(calibration_penalty([FULL, SUBSET], Y, 0.02), torch.tensor([0.03, 0.03, 0.0]))


def test_trick_one_is_conditioned_on_the_superset_being_right():
    # pos 0: full right (c 0.75), subset wrong but more confident (pred 1, c 0.8) -> relu(0.05) = 0.05
    # pos 1: full wrong (c 0.75), subset right and more confident (c 0.8) -> neither trick applies -> 0
    full = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    subset = torch.tensor([[0.0, LN4], [LN4, 0.0]])
    torch.testing.assert_close(calibration_penalty([full, subset], Y[:2]), torch.tensor([0.05, 0.0]))


def test_chain_of_three_sums_consecutive_pairs():
    # (subset -> single): pos 0 subset right, single c 0.5 < 0.8 -> 0; pos 1 subset wrong, single right
    # (pred 0 by the tie rule) -> neither trick -> 0; pos 2 subset right (c 0.75), single c 0.9 -> 0.15
    total = calibration_penalty([FULL, SUBSET, SINGLE], Y)
    torch.testing.assert_close(total, torch.tensor([0.05, 0.05, 0.15]))


def test_trick_two_pushes_only_the_subset():
    full, subset = FULL.clone().requires_grad_(True), SUBSET.clone().requires_grad_(True)
    calibration_penalty([full, subset], Y).sum().backward()
    assert torch.equal(full.grad[1], torch.zeros(2))  # both wrong: the superset's confidence is detached
    assert full.grad[0].abs().sum() > 0 and subset.grad[1].abs().sum() > 0
    assert torch.equal(full.grad[2], torch.zeros(2)) and torch.equal(subset.grad[2], torch.zeros(2))


def test_removal_masks_by_hand():
    ranks = torch.tensor([[1, 0, 2], [2, 1, 0]])  # sample 0 removes m1, then m0; sample 1 removes m2, then m1
    masks = removal_masks(ranks)
    assert torch.equal(masks[0], torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(masks[1], torch.tensor([[True, False, True], [True, True, False]]))
    assert torch.equal(masks[2], torch.tensor([[False, False, True], [True, False, False]]))


def test_errors():
    with pytest.raises(ConfigError, match="at least 2|2 or more"):
        calibration_penalty([FULL], Y)
    with pytest.raises(ConfigError, match="lam"):
        METHODS.build("cml", None, lam=-0.1)
    with pytest.raises(ConfigError, match="epsilon"):
        METHODS.build("cml", None, epsilon=-1.0)
    with pytest.raises(ConfigError, match="modulation_ends"):
        METHODS.build("cml", None, modulation_starts=2, modulation_ends=0)


def test_outside_the_window_it_is_joint_exactly():
    joint, cml, batches = joint_and(CML(CMLConfig(modulation_starts=3, modulation_ends=5)))
    train_steps(batches, 0, joint, cml)
    assert_same_parameters(joint.model, cml.model)


def test_chain_zeroes_each_samples_removed_features_from_a_private_generator():
    trainer, batches = tiny_trainer(CML())
    bal, model, batch = trainer.balancer, trainer.model, batches[0]
    generator_state = bal._generator.get_state()
    rng_state = torch.random.get_rng_state()
    out = bal.forward_step(model, batch)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the main RNG stream is untouched
    replay = torch.Generator().manual_seed(0)
    replay.set_state(generator_state)
    ranks = torch.rand(16, 2, generator=replay).argsort(dim=1)
    chain = out.extras["cml_chain"]
    assert len(chain) == 1  # two modalities: the full input and one single modality
    features, _ = model.encode(batch)
    for i in range(16):
        kept = {m: features[m][i:i + 1] * float(ranks[i, j] >= 1) for j, m in enumerate(model.modalities)}
        torch.testing.assert_close(chain[0][i:i + 1], model.fuse(kept).prediction, rtol=0, atol=1e-6)
    assert (ranks[:, 0] == 0).any() and (ranks[:, 1] == 0).any()  # both modalities get removed somewhere
    terms = bal.loss_terms(out, batch, trainer.task)
    assert set(terms) == {"task", "cml/subsets", "cml/calibration"}
    torch.testing.assert_close(terms["task"], trainer.task.loss(out.prediction, batch["target"]) / 2)


def test_training_state_restores_the_removal_orders():
    trainer, batches = tiny_trainer(CML())
    state = trainer.balancer.training_state()
    first = trainer.balancer.forward_step(trainer.model, batches[0]).extras["cml_chain"][0]
    trainer.balancer.load_training_state(state)
    again = trainer.balancer.forward_step(trainer.model, batches[0]).extras["cml_chain"][0]
    assert torch.equal(first, again)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_run_on_each_declared_synthetic_task(dataset):
    result = short_fit("cml", dataset)
    assert set(result.history[0]["diagnostics"]) == {"penalty", "single_over_full"}


def test_regression_is_not_declared():
    assert not CML.supports(task="reg")


def test_segmentation_sums_each_images_mean_pixel_penalty():
    bal = CML()
    bal.setup(tiny_model(), make_task("cls", 3), lambda params, lr=None, **kw: torch.optim.SGD(params, lr=lr))
    g = torch.Generator().manual_seed(0)
    full, subset = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    out = ModelOutput(full, {}, extras={"cml_chain": [subset]})
    terms = bal.loss_terms(out, {"target": target}, make_task("seg", 4))
    per_pixel = calibration_penalty([full, subset], target)
    assert per_pixel.shape == (2, 3, 5) and per_pixel.sum() > 0
    torch.testing.assert_close(terms["cml/calibration"], 0.1 * (per_pixel[0].mean() + per_pixel[1].mean()))
