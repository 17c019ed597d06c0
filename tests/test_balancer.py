"""Balancer base: the model reference set by ``setup``."""

from __future__ import annotations

import pytest
import torch

from mmbalance.balancer import Balancer
from mmbalance.errors import ConfigError
from mmbalance.tasks import make_task

from .conftest import tiny_model


def test_model_reference_is_set_by_setup_and_stays_out_of_the_state():
    balancer = Balancer()
    with pytest.raises(ConfigError, match="only after setup"):
        _ = balancer.model
    model = tiny_model()
    balancer.setup(model, make_task("cls", 3), lambda params, lr=None, **kw: torch.optim.SGD(params, lr=0.1))
    assert balancer.model is model
    assert balancer.modalities == ("a", "b")
    assert not balancer.state_dict() and not list(balancer.parameters())  # a reference, not a submodule
