"""Failures contained: a method's sys.exit is a failed run, Ctrl-C stops the matrix, and a run whose
loss explodes is recorded as diverged, with its step, and shown as such."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from mmbalance.balancer import Balancer
from mmbalance.cli import main
from mmbalance.errors import DivergedError, NonFiniteLossError, ResultError
from mmbalance.methods import METHODS, register_method
from mmbalance.results import load_rows, read_row
from mmbalance.train import TrainConfig, fit
from tests.conftest import tiny_model, tiny_splits
from tests.faults.conftest import TINY_SET, TINY_SPEC


@pytest.fixture
def method_that(request):
    """``method_that(name, loss_terms)`` registers a throw-away method for one test."""
    names = []

    def register(name, loss_terms):
        cls = type(name, (Balancer,), {"loss_terms": loss_terms, "paper": "test method"})
        register_method(name)(cls)
        names.append(name)
        return name

    yield register
    for name in names:
        METHODS.unregister(name)


def _exits(self, output, batch, task):
    sys.exit(3)


def _interrupted(self, output, batch, task):
    raise KeyboardInterrupt


def test_sys_exit_in_a_method_is_a_failed_run_and_the_matrix_goes_on(tmp_path, spec, method_that, capsys):
    method_that("test_exits", _exits)
    path = spec(TINY_SPEC.replace('"unimodal"', '"test_exits"'))
    code = main(["--threads", "1", "matrix", str(path), "--out", str(tmp_path / "out"), "-q", "--no-tables"])
    assert code == 1  # a run failed
    rows = {r.label: r for r in load_rows(tmp_path / "out").rows}
    assert rows["joint"].status == "ok"
    failed = rows["test_exits"]
    assert failed.status == "failed" and failed.error["type"] == "SystemExit"
    assert failed.error["message"] == "the run called sys.exit(3)" and "_exits" in failed.error["traceback"]
    assert "2 runs: 1 ok, 0 unsupported, 1 failed" in capsys.readouterr().err

    code = main(
        ["--threads", "1", "run", "test_exits", "synthetic_cls2", *TINY_SET, "--out", str(tmp_path / "one")]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "the run called sys.exit(3); nothing was written" in err


def test_ctrl_c_stops_the_matrix_keeping_finished_rows(tmp_path, spec, method_that, capsys):
    method_that("test_interrupted", _interrupted)
    path = spec(TINY_SPEC.replace('"unimodal"', '"test_interrupted"'))
    code = main(["--threads", "1", "matrix", str(path), "--out", str(tmp_path / "out"), "--no-tables"])
    assert code == 130 and "mmbalance: interrupted" in capsys.readouterr().err
    assert [r.label for r in load_rows(tmp_path / "out").rows] == ["joint"]  # the interrupted run: no row


def test_exploding_loss_is_a_diverged_row_shown_in_show_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "--threads",
                "1",
                "run",
                "joint",
                "synthetic_cls2",
                *TINY_SET,
                "--set",
                "lr=1e6",
                "--set",
                "batch_size=16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "DIVERGED: loss" in printed and "above divergence_factor 1000" in printed
    (row,) = load_rows(out).rows
    div = row.data["divergence"]
    assert (
        row.status == "diverged" and row.metrics == {} and isinstance(div["step"], int) and div["epoch"] == 0
    )
    assert main(["show", str(out / f"{row.run_id}.json")]) == 0
    assert capsys.readouterr().out.split("\n", 1)[0].endswith(": DIVERGED")
    assert main(["show", row.run_id, "--out", str(out)]) == 0
    assert f"diverged at step {div['step']} (epoch 0)" in capsys.readouterr().out
    assert main(["table", str(out)]) == 0
    table = capsys.readouterr().out
    assert (
        re.search(r"\| joint +\| +div +\| +div +\|", table)
        and f"div joint on synthetic_cls2, seed 0 (run {row.run_id}): diverged:" in table
    )


def test_a_diverged_run_is_not_redone_on_resume(tmp_path, spec, capsys):
    path = spec(TINY_SPEC.replace('["joint", "unimodal"]', '["joint"]') + "lr = 1e6\nbatch_size = 16\n")
    argv = ["--threads", "1", "matrix", str(path), "--out", str(tmp_path / "out"), "--no-tables"]
    assert main(argv) == 0
    assert "1 runs: 0 ok, 0 unsupported, 0 failed, 1 diverged; 0 already done" in capsys.readouterr().err
    row_file = next((tmp_path / "out").glob("*.json"))
    written = row_file.read_bytes()
    assert main(argv) == 0
    assert "diverged, already done" in capsys.readouterr().err and row_file.read_bytes() == written


def _scripted(losses):
    """A method whose 'task' loss at step t is losses[t] (differentiable, value exact)."""

    def loss_terms(self, output, batch, task):
        step = self.__dict__.setdefault("_step", 0)
        self.__dict__["_step"] = step + 1
        anchor = output.prediction.sum() * 0.0
        return {"task": anchor + losses[step], "aux": anchor + 1e9}  # a huge aux term does not count

    return loss_terms


def test_divergence_bound_by_hand(method_that):
    torch.manual_seed(0)
    splits, spec = tiny_splits(n=64)  # batch 16: 4 steps per epoch
    cfg = TrainConfig(epochs=1, batch_size=16, eval_modality_scores=False)
    # start 2.0: bound = 1000 * max(|2.0|, 1) = 2000; step 1 (1999) stays below, step 2 (2001) is over
    balancer = METHODS.get(method_that("test_scripted", _scripted([2.0, 1999.0, 2001.0, 5.0])))()
    with pytest.raises(
        DivergedError, match=r"loss 2001 at step 2 \(epoch 0\) is above divergence_factor 1000"
    ) as err:
        fit(tiny_model(), balancer, splits, spec, _task(), cfg, torch.device("cpu"))
    assert (err.value.step, err.value.epoch) == (2, 0)
    # a start below 1 in magnitude: bound = 1000 * 1 = 1000, so 999 is fine
    balancer = METHODS.get("test_scripted")()
    balancer.loss_terms = _scripted([-0.5, 999.0, 10.0, 3.0]).__get__(balancer)
    fit(tiny_model(), balancer, splits, spec, _task(), cfg, torch.device("cpu"))
    # divergence_factor=None: only non-finite terms stop a run
    balancer = METHODS.get("test_scripted")()
    balancer.loss_terms = _scripted([2.0, 1e30, float("inf"), 1.0]).__get__(balancer)
    no_bound = TrainConfig(epochs=1, batch_size=16, eval_modality_scores=False, divergence_factor=None)
    with pytest.raises(NonFiniteLossError, match="loss term 'task' is inf at step 2") as err:
        fit(tiny_model(), balancer, splits, spec, _task(), no_bound, torch.device("cpu"))
    assert isinstance(err.value, DivergedError) and err.value.step == 2


def _task():
    from mmbalance.tasks import make_task

    return make_task("cls", 3)


def test_a_diverged_row_needs_its_divergence(tmp_path):
    from tests.result_rows import make_row

    row = make_row("joint", "food101", 0, status="ok", test={"acc": 0.5})
    row.update(
        status="diverged", metrics={}, cost={}, divergence={"step": 3, "epoch": 0, "reason": "loss 1e+30"}
    )
    path = tmp_path / f"{row['run_id']}.json"
    path.write_text(json.dumps(row))
    assert read_row(path).status == "diverged"
    del row["divergence"]
    path.write_text(json.dumps(row))
    with pytest.raises(ResultError, match="a diverged row needs a divergence object"):
        read_row(path)
