"""One run: configuration resolved once into Config objects, stable run ids, each part built once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmbalance.datasets import DATASETS, MultimodalDataset, register_dataset
from mmbalance.errors import ConfigError, RegistryError
from mmbalance.matrix import load_spec, plan_matrix
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.resolve import RunSpec, resolve_run, split_overrides
from mmbalance.runner import run_one
from mmbalance.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "epochs": 1,
    "max_train_batches": 2,
    "cost_steps": 0,
    "eval_modality_scores": False,
    "dataset.n_train": 64,
    "dataset.n_val": 32,
    "dataset.n_test": 32,
}


def test_planned_run_ids_equal_the_committed_rows():
    """The run id of every run of the committed synthetic matrix is the id of its committed row."""
    committed = {}
    for path in (ROOT / "results/synthetic/rows").glob("*.json"):
        row = json.loads(path.read_text())
        committed[(row["label"], row["dataset"], row["seed"])] = row["run_id"]
    runs = plan_matrix(load_spec(ROOT / "results/synthetic/matrix.toml"))
    assert len(runs) == len(committed) == 420  # 33 methods and the unimodal rows, 4 tasks, 3 seeds
    planned = {(r.label, r.dataset, r.seed): r.run_id for r in runs}
    assert planned == committed


def test_resolved_run_holds_the_config_objects():
    resolved = resolve_run(
        RunSpec("cggm", "synthetic_cls3", seed=4, overrides={"rho": 1.5, "train.lr": 0.01})
    )
    assert isinstance(resolved.method_config, METHODS.get("cggm").Config)
    assert isinstance(resolved.train_config, TrainConfig)
    assert isinstance(resolved.dataset_config, DATASETS.get("synthetic_cls3").Config)
    assert isinstance(resolved.model_config, MODELS.get("small_mlp").Config)
    assert resolved.method_config.rho == 1.5 and resolved.train_config.lr == 0.01 and resolved.seed == 4
    assert resolved.train_config.epochs == 8  # the dataset's default preset, "synthetic"
    assert resolved.config == {
        "method": dataclasses.asdict(resolved.method_config),
        "train": dataclasses.asdict(resolved.train_config),
        "dataset": dataclasses.asdict(resolved.dataset_config),
        "model": dataclasses.asdict(resolved.model_config),
    }
    assert (resolved.model, resolved.preset, resolved.task, resolved.modalities) == (
        "small_mlp",
        "synthetic",
        "cls",
        ("strong", "weak", "redundant"),
    )


def test_run_id_depends_on_the_run_only():
    base = resolve_run(RunSpec("joint", "mosi", overrides={"epochs": 2, "lr": 0.01}))
    same = [
        RunSpec("joint", "mosi", overrides={"lr": 0.01, "epochs": 2}),  # order of --set
        RunSpec("joint", "mosi", overrides={"train.epochs": 2, "train.lr": 0.01}),  # prefixed keys
        RunSpec(
            "joint", "mosi", overrides={"epochs": 2, "lr": 0.01}, data_root="/elsewhere"
        ),  # data location
        RunSpec("joint", "mosi", overrides={"epochs": 2, "lr": 0.01, "seed": 666}),  # the preset's own seed
    ]
    assert {resolve_run(s).run_id for s in same} == {base.run_id}
    other = [
        RunSpec("joint", "mosi", overrides={"epochs": 3, "lr": 0.01}),
        RunSpec("joint", "mosi", seed=1),
        RunSpec("joint", "mosei", overrides={"epochs": 2, "lr": 0.01}),
    ]
    assert len({resolve_run(s).run_id for s in other} | {base.run_id}) == 4


def test_resolving_builds_nothing(monkeypatch):
    """Defaults come from class attributes: resolving never builds a dataset or a model builder."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built while resolving")

    for name in DATASETS.names():
        monkeypatch.setattr(DATASETS.get(name), "__init__", refuse)
    for name in MODELS.names():
        monkeypatch.setattr(MODELS.get(name), "__init__", refuse)
    for dataset in DATASETS.names():
        resolved = resolve_run(RunSpec("joint", dataset))
        assert resolved.model == DATASETS.get(dataset).default_model


def test_a_dataset_class_must_declare_what_the_runner_reads():
    with pytest.raises(
        RegistryError, match="class attribute default_model must name a model builder, got None"
    ):

        @register_dataset("test_no_default_model")
        class NoDefaults(MultimodalDataset):
            Config = DATASETS.get("synthetic_cls2").Config
            task = "cls"
            modality_names = ("a", "b")

    assert "test_no_default_model" not in DATASETS.names()


def test_split_overrides_routes_and_rejects():
    classes = {
        "method": METHODS.get("cggm").Config,
        "train": TrainConfig,
        "dataset": DATASETS.get("synthetic_cls2").Config,
        "model": MODELS.get("small_mlp").Config,
    }
    routed = split_overrides(
        {"rho": 1.2, "lr": 0.1, "n_train": 8, "model.dropout": 0.1, "train.seed": 3}, classes
    )
    assert routed == {
        "method": {"rho": 1.2},
        "train": {"lr": 0.1, "seed": 3},
        "dataset": {"n_train": 8},
        "model": {"dropout": 0.1},
    }
    with pytest.raises(ConfigError, match=r"'seed' is ambiguous; use one of train.seed, dataset.seed"):
        split_overrides({"seed": 3}, classes)
    with pytest.raises(ConfigError, match=r"prefix must be one of .* got 'optim'"):
        split_overrides({"optim.lr": 3}, classes)
    with pytest.raises(ConfigError, match=r"unknown config key 'rhoo' for method; did you mean method.rho\?"):
        split_overrides({"method.rhoo": 3}, classes)


def test_each_part_is_built_once_and_the_plan_resolution_is_used(monkeypatch):
    built: dict[str, int] = {}

    def counting(cls):
        original = cls.__init__

        def init(self, *args, **kwargs):
            built[cls.__name__] = built.get(cls.__name__, 0) + 1
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)

    for cls in (DATASETS.get("synthetic_cls2"), MODELS.get("small_mlp"), METHODS.get("joint")):
        counting(cls)
    resolved = resolve_run(RunSpec("joint", "synthetic_cls2", overrides=TINY))
    monkeypatch.setattr("mmbalance.runner.resolve_run", lambda spec: pytest.fail("resolved again"))
    row = run_one(resolved, device="cpu", command="test")
    assert built == {"SyntheticCls2": 1, "SmallMLP": 1, "Joint": 1}
    assert row["run_id"] == resolved.run_id and row["config"] == resolved.config and row["status"] == "ok"


def test_run_one_forms_agree():
    """A RunSpec, keyword arguments and a ResolvedRun give the same run."""
    spec = RunSpec("unimodal", "synthetic_cls2", seed=2, overrides={**TINY, "modality": "weak"})
    a = run_one(spec, device="cpu", command="a")
    b = run_one(resolve_run(spec), device="cpu", command="a")
    c = run_one(
        method="unimodal",
        dataset="synthetic_cls2",
        seed=2,
        overrides={**TINY, "modality": "weak"},
        device="cpu",
        command="a",
    )
    assert a["run_id"] == b["run_id"] == c["run_id"] and a["label"] == "unimodal[weak]"
    assert a["metrics"] == b["metrics"] == c["metrics"]
    with pytest.raises(ConfigError, match="either a RunSpec or keyword arguments"):
        run_one(spec, method="joint")
