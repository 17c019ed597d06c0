"""--log tensorboard|mlflow: what a run wrote is read back with each tracker's own reader."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mmbalance.cli import main
from mmbalance.errors import ConfigError
from mmbalance.resolve import RunSpec
from mmbalance.runner import run_one
from mmbalance.tracking import RunTracker, Tracking, flatten_numbers, flatten_params, parse_log

TINY = {
    "epochs": 2, "max_train_batches": 2, "cost_steps": 2, "cost_warmup": 1,
    "dataset.n_train": 64, "dataset.n_val": 32, "dataset.n_test": 32,
}


def _run(tracking):
    return run_one(RunSpec("cggm", "synthetic_cls2", seed=3, overrides=TINY), tracking=tracking)


def test_flattening_and_option_parsing():
    record = {"train_loss": 0.5, "val": {"acc": 0.75, "score/weak": 0.5}, "steps": 2, "note": "x", "l": [1]}
    expected = {"train_loss": 0.5, "val/acc": 0.75, "val/score/weak": 0.5, "steps": 2.0}
    assert flatten_numbers(record) == expected
    params = flatten_params({"method": {"rho": 1.3, "direction": None}, "train": {"lr": 0.001}})
    assert params == {"method.rho": "1.3", "method.direction": "null", "train.lr": "0.001"}
    assert parse_log(["tensorboard,mlflow", "mlflow"]) == ("tensorboard", "mlflow")
    with pytest.raises(ConfigError, match=r"--log must be one of tensorboard, mlflow .*got 'wandb'"):
        parse_log(["wandb"])


def test_a_missing_tracker_package_is_a_clear_error_before_training(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ConfigError, match=r"--log mlflow needs the 'mlflow' package: .*mlflow"):
        RunTracker(Tracking(("mlflow",), str(tmp_path)), {"run_id": "abc"})


def test_tensorboard_event_files_hold_the_history_metrics_and_cost(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    row = _run(Tracking(("tensorboard",), str(tmp_path)))
    runs = [p.name for p in tmp_path.iterdir()]
    assert runs == [row["run_id"]]  # the run id names the TensorBoard run
    events = EventAccumulator(str(tmp_path / row["run_id"]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "val/acc", "diagnostics/B/weak", "test/acc", "cost/step_time_ratio"} <= scalars
    for name, key in (("val/acc", ("val", "acc")), ("diagnostics/B/weak", ("diagnostics", "B/weak"))):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(h["epoch"], h[key[0]][key[1]]) for h in row["history"]]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert events.Scalars("test/acc")[0].value == pytest.approx(row["metrics"]["test"]["acc"], rel=1e-6)
    ratio = events.Scalars("cost/step_time_ratio")[0].value
    assert ratio == pytest.approx(row["cost"]["step_time_ratio"], rel=1e-6)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method.rho": "1.3"' in config and row["run_id"] in config


def test_mlflow_sqlite_store_holds_params_history_metrics_and_status(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    tracking = Tracking(("mlflow",), str(tmp_path), experiment="cggm_test")
    row = _run(tracking)
    client = MlflowClient(tracking_uri=tracking.uri)
    assert tracking.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    experiment = client.get_experiment_by_name("cggm_test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == row["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["mmbalance.label"] == "cggm" and run.data.tags["mmbalance.status"] == "ok"
    assert run.data.params["method.rho"] == "1.3" and run.data.params["train.seed"] == "3"
    assert json.loads(run.data.params["method.direction"]) == row["config"]["method"]["direction"]
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (h["epoch"], pytest.approx(h["val"]["acc"])) for h in row["history"]
    ]
    assert run.data.metrics["test/acc"] == pytest.approx(row["metrics"]["test"]["acc"])
    assert run.data.metrics["best_epoch"] == row["metrics"]["best_epoch"]
    assert run.data.metrics["cost/mem_overhead_bytes"] == row["cost"]["mem_overhead_bytes"]
    failed = RunTracker(tracking, {"run_id": "0123456789ab", "config": {}})
    failed.fail(RuntimeError("boom"))
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses["0123456789ab"] == "FAILED"


def test_the_run_command_logs_into_its_output_folder(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    out = tmp_path / "runs"
    assert main(["run", "joint", "synthetic_cls2", "--out", str(out), "--log", "tensorboard", *sets]) == 0
    (row_file,) = out.glob("*.json")
    assert (out / "tracking" / row_file.stem).is_dir()
    assert main(["run", "joint", "synthetic_cls2", "--out", str(out), "--log-dir", str(tmp_path)]) == 2
    assert "--log-dir / --mlflow-uri need --log" in capsys.readouterr().err


def test_the_matrix_command_logs_every_run(tmp_path):
    pytest.importorskip("tensorboard")
    spec = tmp_path / "m.toml"
    spec.write_text(
        'methods = ["joint"]\ndatasets = ["synthetic_cls2"]\nseeds = [0, 1]\n[overrides]\n'
        + "".join(f"{json.dumps(k)} = {v}\n" for k, v in TINY.items())
    )
    out = tmp_path / "out"
    argv = ["matrix", str(spec), "--out", str(out), "--log", "tensorboard", "--log-dir", str(tmp_path / "tb")]
    assert main([*argv, "--quiet", "--no-tables"]) == 0
    rows = sorted(p.stem for p in out.glob("*.json"))
    assert len(rows) == 2 and sorted(p.name for p in (tmp_path / "tb").iterdir()) == rows
