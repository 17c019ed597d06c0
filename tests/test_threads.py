"""Threads per run: the rule, the forward-FLOP probe that leaves training unchanged, the record in the
row, the run id, the results-folder check, and the cost measured at the run's last epoch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mmbalance.runner as runner
from mmbalance.errors import ConfigError
from mmbalance.matrix import load_spec, plan_matrix
from mmbalance.matrix_run import check_thread_count
from mmbalance.results import ResultRow
from mmbalance.threads import (
    ONE_THREAD_BELOW_FLOPS,
    auto_threads,
    decide_threads,
    forward_flops,
    intra_op_threads,
    parse_threads,
)
from tests.result_rows import make_row

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = {"epochs": 2, "max_train_batches": 2, "cost_steps": 2, "cost_warmup": 1, "eval_modality_scores": False,
        "dataset.n_train": 64, "dataset.n_val": 32, "dataset.n_test": 32}


class Linear43(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, batch):
        return self.drop(self.lin(batch["x"]))


def test_the_rule_at_its_boundary():
    assert auto_threads(ONE_THREAD_BELOW_FLOPS - 1, 8) == 1
    assert auto_threads(ONE_THREAD_BELOW_FLOPS, 8) == 8


def test_forward_flops_by_hand_leaves_model_and_rng_alone():
    model = Linear43().train()
    state = torch.get_rng_state()
    # Linear(4, 3) on a batch of 2: 2 * 2 * 4 * 3 = 48 FLOPs (a multiply and an add per weight use)
    assert forward_flops(model, {"x": torch.ones(2, 4)}) == 48
    assert model.training and torch.equal(torch.get_rng_state(), state)


def test_decide_threads():
    model, batch = Linear43(), {"x": torch.ones(2, 4)}
    measured = {"forward_flops": 48, "one_thread_below_flops": ONE_THREAD_BELOW_FLOPS}
    with intra_op_threads(2):
        count, rule = decide_threads("auto", model, batch, CPU)
        assert count == 1 and rule == {"setting": "auto", **measured, "default_threads": 2}
        assert decide_threads(3, model, batch, CPU)[0] == 3
        assert decide_threads(None, model, batch, CPU) == (2, {"setting": "current", **measured})
        cuda_count, cuda_rule = decide_threads("auto", model, None, torch.device("cuda"))
        assert cuda_count == 2 and "forward_flops" not in cuda_rule  # nothing measured for an accelerator
    with pytest.raises(ConfigError, match="threads must be 'auto' or an integer >= 1, got 0"):
        decide_threads(0, model, batch, CPU)


def test_parse_threads_and_restore():
    assert parse_threads("auto") == "auto" and parse_threads("3") == 3
    for bad in ("0", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="--threads must be 'auto' or an integer >= 1"):
            parse_threads(bad)
    before = torch.get_num_threads()
    with intra_op_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_run_records_threads_keeps_its_id_and_training(monkeypatch):
    from mmbalance.resolve import RunSpec, resolve_run

    resolved = resolve_run(RunSpec("ogm", "synthetic_cls2", overrides=TINY))
    with intra_op_threads(2):
        row = runner.run_one(resolved, device="cpu", threads="auto")
        assert torch.get_num_threads() == 2  # restored after the run
    assert row["run_id"] == resolved.run_id
    assert row["env"]["threads"] == 1 and row["env"]["device"].endswith("1 threads)")
    assert row["env"]["threads_rule"]["setting"] == "auto"
    assert row["env"]["threads_rule"]["forward_flops"] < ONE_THREAD_BELOW_FLOPS
    assert row["cost"]["epoch"] == 1  # costed at the last trained epoch (ogm's window starts at 1)
    # The FLOP probe changes nothing: a run that skips it trains to the same bits.
    monkeypatch.setattr(runner, "decide_threads", lambda setting, model, batch, device: (1, {}))
    with intra_op_threads(2):
        plain = runner.run_one(resolved, device="cpu", threads="auto")
    assert plain["metrics"] == row["metrics"] and plain["history"][-1]["terms"] == row["history"][-1]["terms"]


def test_committed_rows_keep_their_ids_under_the_thread_rule():
    """Threads are not part of a run's identity: the committed joint rows' ids are planned unchanged."""
    committed = {}
    for path in (ROOT / "results/synthetic/rows").glob("*.json"):
        row = json.loads(path.read_text())
        if row["method"] == "joint":
            committed[(row["dataset"], row["seed"])] = row["run_id"]
    runs = plan_matrix(load_spec(ROOT / "results/synthetic/matrix.toml"))
    planned = {(r.dataset, r.seed): r.run_id for r in runs if r.label == "joint"}
    assert len(committed) == 12 and planned == committed


def _row(threads, rule=None):
    row = make_row("joint", "synthetic_cls2", 0, {"acc": 0.5})
    row["env"].update(device_type="cpu", threads=threads, **({"threads_rule": rule} if rule else {}))
    return ResultRow.from_dict(row)


def test_folder_check_under_auto_and_fixed_counts(tmp_path):
    small = {"setting": "auto", "forward_flops": 10}
    large = {"setting": 4, "forward_flops": ONE_THREAD_BELOW_FLOPS}
    with intra_op_threads(2):
        check_thread_count([_row(1, small), _row(2, large)], CPU, "auto", tmp_path)  # what auto would do
        with pytest.raises(ConfigError, match=r"made with 4 intra-op thread.*run with 2 \(--threads auto\)"):
            check_thread_count([_row(4, large)], CPU, "auto", tmp_path)
        with pytest.raises(ConfigError, match="no record of the thread rule's input.*--threads 1"):
            check_thread_count([_row(1)], CPU, "auto", tmp_path)  # a row made before the rule
        check_thread_count([_row(1)], CPU, 1, tmp_path)
        with pytest.raises(ConfigError, match="--threads 1 ..."):
            check_thread_count([_row(1, small)], CPU, 2, tmp_path)
        check_thread_count([_row(1)], torch.device("cuda"), "auto", tmp_path)  # only CPU rows are checked
