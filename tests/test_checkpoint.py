"""Epoch checkpoints: when they are written, what they restore, and the errors of a foreign or broken
file. (The registry-wide "stop, resume, finish == straight through" test is in
tests/methods/test_contract.py; a run SIGKILLed and resumed through the CLI is in
tests/test_matrix_claims.py.)"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmbalance.checkpoint import (
    AUTO_MIN_SECONDS,
    CHECKPOINT_FILE,
    RunCheckpoint,
    _rng_state,
    _set_rng_state,
    comparable_row,
    parse_checkpoint_every,
)
from mmbalance.errors import ConfigError, ResultError
from mmbalance.output import temp_path

from .methods._helpers import short_fit

RUN = "0123456789ab"
CPU = torch.device("cpu")


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("0", 0), ("3", 3), (2, 2), (" 4 ", 4)])
def test_checkpoint_every_accepts_auto_and_epochs(text, expected):
    assert parse_checkpoint_every(text) == expected


@pytest.mark.parametrize("text", ["-1", "x", "1.5", "", True, None])
def test_checkpoint_every_refuses_anything_else(text):
    with pytest.raises(ConfigError, match=r"--checkpoint-every must be 'auto' or an integer >= 0"):
        parse_checkpoint_every(text)


def test_when_checkpoints_are_due(tmp_path):
    every2 = RunCheckpoint(tmp_path, RUN, every=2)
    assert [e for e in range(5) if every2.due(e, 5, 0.0)] == [1, 3, 4]  # every 2nd epoch and the last
    assert not any(RunCheckpoint(tmp_path, RUN, every=0).due(e, 5, 1e9) for e in range(5))
    auto = RunCheckpoint(tmp_path, RUN)
    # expected length = time so far / epochs done * epochs, against AUTO_MIN_SECONDS (60 s)
    assert AUTO_MIN_SECONDS == 60.0
    assert not auto.due(0, 10, 5.9)  # 5.9 s * 10 = 59 s
    assert auto.due(0, 10, 6.0)  # 60 s
    assert not auto.due(2, 3, 59.0)  # 59 / 3 * 3 = 59 s
    assert auto.due(1, 3, 40.0)  # 40 / 2 * 3 = 60 s


def test_random_states_round_trip_through_a_saved_file(tmp_path):
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    next(iter(loader))
    path = tmp_path / "rng.pt"
    torch.save(_rng_state(CPU, loader), path)

    def draws():
        batches = [b[0].tolist() for b in loader]
        return random.random(), float(np.random.rand()), torch.rand(()).item(), batches

    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    loader.generator.manual_seed(9)
    _set_rng_state(torch.load(path, weights_only=True), CPU, loader)
    assert draws() == expected


def test_a_fit_with_checkpoints_resumes_from_the_last_one(tmp_path):
    """short_fit twice on one checkpoint folder: the second call finds the last epoch's checkpoint
    and trains nothing, with the first call's metrics and history."""
    checkpoint = RunCheckpoint(tmp_path / "ck", RUN, every=1)
    first = short_fit("joint", "synthetic_cls2", epochs=2, samples=64, checkpoint=checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 1
    assert not [p for p in checkpoint.folder.iterdir() if p.name != CHECKPOINT_FILE]  # no temp file
    again = short_fit("joint", "synthetic_cls2", epochs=2, samples=64, checkpoint=checkpoint)
    assert again.resumed_from_epoch == 2 and again.steps == first.steps == 4
    assert again.test == first.test and again.best_epoch == first.best_epoch
    assert [r["val"] for r in again.history] == [r["val"] for r in first.history]
    checkpoint.remove()
    assert not checkpoint.folder.exists()


def test_no_checkpoint_for_every_0_or_a_short_run_on_auto(tmp_path):
    for every in (0, "auto"):  # the tiny fit is expected to train far less than a minute
        checkpoint = RunCheckpoint(tmp_path / str(every), RUN, every=every)
        short_fit("joint", "synthetic_cls2", epochs=2, samples=64, checkpoint=checkpoint)
        assert not checkpoint.folder.exists()


def test_a_checkpoint_of_another_run_or_a_broken_file_is_an_error_saying_how_to_start_over(tmp_path):
    checkpoint = RunCheckpoint(tmp_path / "ck", RUN, every=1)
    short_fit("joint", "synthetic_cls2", epochs=1, samples=64, checkpoint=checkpoint)
    other = RunCheckpoint(checkpoint.folder, "ba9876543210", every=1)
    with pytest.raises(ResultError, match=r"is not a format-1 checkpoint of run ba9876543210 \(found "
                                          r"'0123456789ab'\); remove the folder .* from its first epoch"):
        short_fit("joint", "synthetic_cls2", epochs=1, samples=64, checkpoint=other)
    checkpoint.path.write_bytes(checkpoint.path.read_bytes()[:100])
    with pytest.raises(ResultError, match=r"checkpoint '.*checkpoint.pt' cannot be read \(.*\); remove the "):
        short_fit("joint", "synthetic_cls2", epochs=1, samples=64, checkpoint=checkpoint)


def test_a_killed_writer_s_temporary_file_is_removed_before_loading(tmp_path):
    checkpoint = RunCheckpoint(tmp_path / "ck", RUN, every=1)
    checkpoint.folder.mkdir(parents=True)
    mine = temp_path(checkpoint.path)  # .checkpoint.pt.<pid>@<host>.tmp
    stray = mine.with_name(mine.name.replace(f".{os.getpid()}@", ".999999999@"))
    stray.write_bytes(b"half a checkpoint")
    short_fit("joint", "synthetic_cls2", epochs=1, samples=64, checkpoint=checkpoint)
    assert not stray.exists() and checkpoint.path.is_file()


def test_comparable_row_leaves_out_timing_and_execution_fields():
    row = {
        "run_id": RUN, "metrics": {"test": {"acc": 0.5}}, "attempts": 2, "resumed_from_epoch": 3,
        "takeover": {"pid": 1}, "env": {"node": "n1", "ray_task_id": "t", "threads": 1},
        "cost": {"train_time_s": 3.0, "step_time_ratio": 1.1, "train_steps": 10},
        "history": [{"epoch": 0, "epoch_time_s": 0.2, "loader_wait_s": 0.0, "train_loss": 1.0}],
    }
    assert comparable_row(row) == {
        "run_id": RUN, "metrics": {"test": {"acc": 0.5}}, "env": {"threads": 1}, "cost": {"train_steps": 10},
        "history": [{"epoch": 0, "train_loss": 1.0}],
    }
