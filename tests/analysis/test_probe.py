"""Probe machinery on tiny configurations (the full table is results/imbalance/README.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.analysis.probe import (
    LinearProbe,
    ProbeConfig,
    format_table,
    gap,
    imbalance_experiment,
    imbalance_table,
    main,
    train_probe,
)
from mmbalance.errors import ConfigError, MMBalanceError, ShapeError
from mmbalance.tasks import make_task

TINY_TRAIN = {"epochs": 1, "batch_size": 32}
TINY_PROBE = ProbeConfig(epochs=2, batch_size=32)


@pytest.mark.parametrize(
    ("feature_shape", "num_outputs", "target_shape", "expected"),
    [((6,), 3, (), (2, 3)), ((5, 6), 1, (), (2, 1)), ((4, 3, 3), 4, (6, 6), (2, 4, 6, 6))],
)
def test_linear_probe_shapes(feature_shape, num_outputs, target_shape, expected):
    probe = LinearProbe(feature_shape, num_outputs, target_shape)
    assert tuple(probe(torch.randn(2, *feature_shape)).shape) == expected
    with pytest.raises(ShapeError, match="expected"):
        probe(torch.randn(2, *feature_shape[:-1], feature_shape[-1] + 1))


def test_linear_probe_is_linear():
    torch.manual_seed(0)
    probe = LinearProbe((4, 3, 3), 4, (6, 6))
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    bias_free = probe(x + y) - probe(y)  # affine: f(x + y) - f(y) = f(x) - f(0)
    assert torch.allclose(bias_free, probe(x) - probe(torch.zeros_like(x)), atol=1e-5)


def test_feature_map_probe_needs_2d_target():
    with pytest.raises(ShapeError, match="target_shape"):
        LinearProbe((4, 3, 3), 4, ())


def _features(signal: float, seed: int = 0):
    """4-class features whose first 4 dims are ``signal`` * one-hot(label) plus unit noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", 400), ("val", 200), ("test", 200)):
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 8, generator=g)
        x[:, :4] += signal * torch.nn.functional.one_hot(y, 4).float()
        out[split] = (x, y)
    return out


def test_train_probe_reads_linear_signal_and_not_noise():
    task = make_task("cls", 4)
    cfg = ProbeConfig(epochs=20, batch_size=64)
    informative = train_probe(_features(4.0), task, (), cfg)
    noise = train_probe(_features(0.0), task, (), cfg)
    assert informative.test["acc"] > 0.9
    assert noise.test["acc"] < 0.4
    assert 0 <= informative.best_epoch < cfg.epochs


def test_train_probe_is_seeded_and_leaves_global_rng():
    task = make_task("cls", 4)
    state = torch.random.get_rng_state()
    a = train_probe(_features(1.0), task, (), TINY_PROBE, seed=3)
    b = train_probe(_features(1.0), task, (), TINY_PROBE, seed=3)
    assert a.test == b.test
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ConfigError, match="'test'"):
        train_probe({k: v for k, v in _features(1.0).items() if k != "test"}, task, (), TINY_PROBE)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_reg3"])
def test_imbalance_experiment_tiny(dataset):
    row = imbalance_experiment(
        dataset,
        0,
        dataset_overrides={"n_train": 64, "n_val": 32, "n_test": 32},
        train_overrides=TINY_TRAIN,
        probe=TINY_PROBE,
    )
    assert row["modality"] == {"synthetic_cls2": "weak", "synthetic_reg3": "audio"}[dataset]
    key = row["primary_metric"]
    assert set(row["test"]) == {"unimodal", "joint", "probe_joint", "probe_unimodal", "probe_random"}
    for variant, metrics in row["test"].items():
        assert math.isfinite(metrics[key]), variant
    assert row["config"]["dataset"]["seed"] == 0 and row["config"]["train"]["epochs"] == 1
    sign = 1 if key == "acc" else -1
    assert gap(row, key) == pytest.approx(
        sign * (row["test"]["unimodal"][key] - row["test"]["probe_joint"][key])
    )


def test_imbalance_table_and_markdown():
    rows, table = imbalance_table(
        ["synthetic_cls2"],
        [0, 1],
        dataset_overrides={"n_train": 48, "n_val": 16, "n_test": 16},
        train_overrides=TINY_TRAIN,
        probe=TINY_PROBE,
    )
    assert [r["seed"] for r in rows] == [0, 1]
    lines = table.splitlines()
    assert lines[0].startswith("| dataset | weak modality | metric | n |") and "gap" in lines[0]
    assert lines[2].startswith("| synthetic_cls2 | weak | acc ↑ | 2 |")
    assert lines[2].count("±") == 6
    assert format_table(rows) == table


def test_bad_requests_raise():
    with pytest.raises(ConfigError, match="modality must be one of"):
        imbalance_experiment("synthetic_cls2", 0, modality="audio", dataset_overrides={"n_train": 8})
    with pytest.raises(ConfigError, match="unknown TrainConfig keys"):
        imbalance_experiment(
            "synthetic_cls2", 0, train_overrides={"epoch": 1}, dataset_overrides={"n_train": 8}
        )
    with pytest.raises(MMBalanceError, match="synthetic_cls9"):
        imbalance_experiment("synthetic_cls9", 0)
    with pytest.raises(ConfigError, match="seeds"):
        imbalance_table(["synthetic_cls2"], [])
    with pytest.raises(ValueError, match="epochs"):
        ProbeConfig(epochs=0)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--seeds" in capsys.readouterr().out
