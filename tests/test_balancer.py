"""Balancer base: the ``model`` reference and the ``epoch_means`` accumulator set by ``setup``."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods.joint import Joint
from mmbalance.tasks import make_task

from .conftest import tiny_model


def test_model_reference_is_set_by_setup_and_stays_out_of_the_state():
    balancer = Joint()
    with pytest.raises(ConfigError, match="only after setup"):
        _ = balancer.model
    model = tiny_model()
    balancer.setup(model, make_task("cls", 3), lambda params, **kw: None)
    assert balancer.model is model
    assert not list(balancer.parameters()) and not balancer.state_dict()
    assert "_model_ref" not in dict(balancer.named_modules())


def test_setup_rejects_a_task_the_method_does_not_declare():
    from mmbalance.errors import UnsupportedError
    from mmbalance.methods import METHODS

    pmr = METHODS.build("pmr")  # classification only
    with pytest.raises(UnsupportedError, match="method 'pmr' supports tasks \\['cls'\\], not task 'reg'"):
        pmr.setup(tiny_model(classes=1), make_task("reg", 1), lambda params, **kw: None)


def test_setup_gives_an_epoch_accumulator_over_the_modalities():
    balancer = Joint()
    model = tiny_model()
    balancer.setup(model, make_task("cls", 3), lambda params, **kw: None)
    assert balancer.epoch_means.modalities == tuple(model.modalities)
    # per-modality statistics are named <stat>/<modality>; means over steps: (1 + 3) / 2, (2 + 6) / 2
    balancer.epoch_means.update(ratio=torch.tensor([1.0, 2.0]))
    balancer.epoch_means.update(ratio=torch.tensor([3.0, 6.0]))
    a, b = model.modalities
    assert balancer.epoch_means.pop() == {f"ratio/{a}": 2.0, f"ratio/{b}": 4.0}
    # a new setup (a fresh run on the same balancer) starts from an empty accumulator
    balancer.epoch_means.update(ratio=torch.tensor([1.0, 1.0]))
    balancer.setup(model, make_task("cls", 3), lambda params, **kw: None)
    assert balancer.epoch_means.pop() == {}
