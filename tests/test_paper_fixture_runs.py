"""Issue 5 acceptance: each paper model trains 2 steps through `mmbalance run` on fixture data
written in the real on-disk formats (CPU). The fast variant uses the reduced model sizes of
`matrices/paper_fixtures.toml`; the `slow` variant builds the models at full paper size."""

from __future__ import annotations

import json

import pytest

from mmbalance.cli import main
from mmbalance.datasets.fixtures import write_fixtures

SMALL = {
    "food101": ["dataset.image_size=64", "model.image_size=64", "vit_depth=2", "vit_dim=64", "vit_heads=2",
                "bert_layers=2", "bert_dim=64", "bert_heads=2", "nlevels=3"],
    "mosi": ["nlevels=3"],
    "iemocap": ["nlevels=3"],
    "brats2021": ["crop_size=32", "backbone=resnet18", "multi_grid=[]"],
}
# fixture volumes are 48 x 48
FULL = {"food101": [], "mosi": [], "iemocap": [], "brats2021": ["crop_size=32"]}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    write_fixtures(root)
    return root


def _run(dataset, extra, root, out):
    args = ["--threads", "1", "run", "cggm", dataset, "--data-root", str(root), "--out", str(out),
            "--device", "cpu", "--set", "epochs=1", "--set", "max_train_batches=2", "--set", "batch_size=2",
            "--set", "cost_steps=0"]
    for kv in extra:
        args += ["--set", kv]
    assert main(args) == 0
    (row_file,) = out.glob("*.json")
    row = json.loads(row_file.read_text())
    assert row["status"] == "ok" and row["dataset"] == dataset
    assert row["cost"]["train_steps"] == 2
    assert row["metrics"]["test"], "no test metrics"
    assert row["history"][0]["diagnostics"], "CGGM diagnostics missing from the history"
    return row


@pytest.mark.parametrize("dataset", sorted(SMALL))
def test_paper_model_trains_two_steps_on_fixture(dataset, fixture_root, tmp_path):
    _run(dataset, SMALL[dataset], fixture_root, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(FULL))
def test_full_size_paper_model_trains_two_steps_on_fixture(dataset, fixture_root, tmp_path):
    _run(dataset, FULL[dataset], fixture_root, tmp_path)
