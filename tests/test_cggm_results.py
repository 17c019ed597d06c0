"""results/cggm: its specs plan the runs of its committed rows, and `mmbalance table` renders them."""

from __future__ import annotations

import json
from pathlib import Path

from mmbalance.matrix import load_spec, plan_matrix
from mmbalance.results import load_plan, load_rows
from mmbalance.tables import metric_table

ROOT = Path(__file__).resolve().parents[1] / "results" / "cggm"


def _planned(spec: str = "variants"):
    runs = plan_matrix(load_spec(ROOT / "specs" / f"{spec}.toml"))
    return {(r.label, r.dataset, r.seed): r for r in runs}


def test_the_specs_plan_exactly_the_committed_runs():
    for spec, count in (("variants", 168), ("ablation", 48)):
        planned = _planned(spec)
        rows = [json.loads(p.read_text()) for p in (ROOT / "rows" / spec).glob("*.json")]
        assert len(planned) == len(rows) == count
        committed = {(row["label"], row["dataset"], row["seed"]): row["run_id"] for row in rows}
        assert committed == {key: run.run_id for key, run in planned.items()}, spec


def test_the_ablation_shares_its_joint_runs_with_the_clipped_protocol():
    ablation = plan_matrix(load_spec(ROOT / "specs" / "ablation.toml"))
    assert len(ablation) == 48
    planned = _planned()
    for run in ablation:
        if run.label == "joint":
            assert run.run_id == planned[("joint[clip_grad_norm=0.8]", run.dataset, run.seed)].run_id
    configs = {r.label: r.resolved.method_config for r in ablation if r.method == "cggm"}
    magnitude, direction, both = configs["cggm_magnitude"], configs["cggm_direction"], configs["cggm_both"]
    assert (magnitude.rho, magnitude.direction, magnitude.magnitude) == (1.0, None, True)
    assert (direction.lam, direction.direction, direction.magnitude) == (0.1, "official", False)
    assert (both.rho, both.lam, both.direction, both.magnitude) == (1.0, 0.1, "official", True)


def test_the_table_of_the_committed_rows_has_one_row_per_variant_and_protocol():
    folder = ROOT / "rows" / "variants"
    loaded = load_rows(folder)
    plan, problems = load_plan(folder)
    assert not loaded.problems and not problems
    text = metric_table(loaded.rows, plan=plan, metrics=["acc"], delta=True, max_width=0)
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    for variant in ("cggm_official", "cggm_paper", "cggm_stabilize"):
        for clip in ("none", "0.8"):
            assert f"{variant}[clip_grad_norm={clip}]" in lines
    # README: protocol B official cls2 accuracy 89.2, Δ against the clipped joint -2.4
    assert "89.23 ± 1.30 (3)" in lines["cggm_official[clip_grad_norm=0.8]"]
    assert "-2.37" in lines["cggm_official[clip_grad_norm=0.8]"]
