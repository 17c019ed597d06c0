"""Matrix specs with named method variants and grids: parsing, expansion, labels, run ids, tables."""

from __future__ import annotations

import pytest

from mmbalance.config import format_set, parse_set
from mmbalance.errors import ConfigError, RegistryError
from mmbalance.matrix import parse_spec, plan_matrix
from mmbalance.resolve import RunSpec, resolve_run
from mmbalance.results import Plan, PlannedCell, ResultRow
from mmbalance.table_stats import below_single_modality, identical_to_joint, joint_of
from mmbalance.tables import metric_table
from mmbalance.variants import reference_label, row_label, swept_items

SETS = {"epochs": 1, "dataset.n_train": 64, "dataset.n_val": 32, "dataset.n_test": 32}


def _spec(**extra):
    data = {"methods": ["joint"], "datasets": ["synthetic_cls2"], "seeds": [0], "preset": "synthetic"}
    data.update(extra)
    return parse_spec(data, "test.toml")


def _plain_id(method, **overrides):
    run = RunSpec(method, "synthetic_cls2", preset="synthetic", seed=0, overrides=overrides)
    return resolve_run(run).run_id


def test_a_variant_is_a_row_of_its_own_with_the_run_id_of_the_same_plain_run():
    spec = _spec(variants={"cggm_paper": {"method": "cggm", "direction": "paper", "stabilize": False}})
    runs = plan_matrix(spec)
    assert [r.label for r in runs] == ["joint", "cggm_paper"]
    assert runs[1].method == "cggm" and runs[1].resolved.label == "cggm_paper"
    assert runs[1].resolved.method_config.direction == "paper"
    # the run id is the resolved run's: the same as the plain method with the same overrides
    assert runs[1].run_id == _plain_id("cggm", direction="paper", stabilize=False)
    assert runs[0].run_id == _plain_id("joint")
    assert "--set direction=paper" in runs[1].command()


def test_a_variant_listed_in_methods_takes_that_place_and_method_overrides_reach_it():
    spec = _spec(
        methods=["cggm_official", "joint"],
        variants={
            "cggm_official": {"method": "cggm"},
            "cggm_paper": {"method": "cggm", "direction": "paper"},
        },
        method_overrides={"cggm": {"rho": 1.1}},
    )
    runs = plan_matrix(spec)
    assert [r.label for r in runs] == ["cggm_official", "joint", "cggm_paper"]
    assert {r.resolved.method_config.rho for r in runs if r.method == "cggm"} == {1.1}
    # a variant's own key beats [method_overrides.<its method>]
    spec = _spec(variants={"v": {"method": "cggm", "rho": 1.6}}, method_overrides={"cggm": {"rho": 1.1}})
    assert plan_matrix(spec)[1].resolved.method_config.rho == 1.6


def test_list_values_expand_to_a_grid_with_the_swept_values_in_the_label():
    spec = _spec(
        methods=["joint", "cggm"],
        method_overrides={"cggm": {"rho": [1.0, 1.3], "lam": [0.1, 0.2]}},
    )
    runs = plan_matrix(spec)
    assert [r.label for r in runs] == [
        "joint",
        "cggm[rho=1.0, lam=0.1]", "cggm[rho=1.0, lam=0.2]",
        "cggm[rho=1.3, lam=0.1]", "cggm[rho=1.3, lam=0.2]",
    ]
    point = runs[3]
    assert (point.resolved.method_config.rho, point.resolved.method_config.lam) == (1.3, 0.1)
    assert point.run_id == _plain_id("cggm", rho=1.3, lam=0.1)
    assert len({r.run_id for r in runs}) == 5


def test_a_grid_over_every_run_keeps_the_modality_first_and_none_as_text():
    spec = _spec(methods=["joint", "unimodal"], overrides={"clip_grad_norm": ["none", 0.8]})
    runs = plan_matrix(spec)
    assert [r.label for r in runs] == [
        "joint[clip_grad_norm=none]", "joint[clip_grad_norm=0.8]",
        "unimodal[strong, clip_grad_norm=none]", "unimodal[weak, clip_grad_norm=none]",
        "unimodal[strong, clip_grad_norm=0.8]", "unimodal[weak, clip_grad_norm=0.8]",
    ]
    assert runs[0].resolved.train_config.clip_grad_norm is None
    assert runs[0].run_id == _plain_id("joint", clip_grad_norm=None)  # "none" is None, the same run
    assert "--set clip_grad_norm=none" in runs[0].command()
    assert parse_set(["clip_grad_norm=none"]) == {"clip_grad_norm": "none"}
    assert format_set("clip_grad_norm", None) == "clip_grad_norm=none"


def test_set_values_are_never_swept_and_a_later_single_value_ends_a_sweep():
    spec = _spec(methods=["cggm"], method_overrides={"cggm": {"rho": [1.0, 1.3]}})
    assert [r.label for r in plan_matrix(spec, set_overrides={"rho": 1.6})] == ["cggm"]
    with pytest.raises(ConfigError, match=r"rho must be a number, got \[1.0, 1.6\]"):  # a value, not a grid
        plan_matrix(spec, set_overrides={"rho": [1.0, 1.6]})
    spec = _spec(
        methods=["cggm"], overrides={"lr": [0.01, 0.001]}, method_overrides={"cggm": {"lr": 0.005}},
    )
    runs = plan_matrix(spec)
    assert [r.label for r in runs] == ["cggm"] and runs[0].resolved.train_config.lr == 0.005


def test_a_field_that_takes_a_list_is_swept_by_a_list_of_lists():
    data = {"methods": ["joint"], "datasets": ["synthetic_seg4"], "seeds": [0], "model": "deeplab"}
    one = parse_spec({**data, "overrides": {"model.aspp_rates": [2, 4, 6]}}, "t.toml")
    runs = plan_matrix(one)
    assert [r.label for r in runs] == ["joint"] and runs[0].resolved.model_config.aspp_rates == (2, 4, 6)
    grid = parse_spec({**data, "overrides": {"model.aspp_rates": [[2, 4, 6], [1, 2, 3]]}}, "t.toml")
    runs = plan_matrix(grid)
    assert [r.label for r in runs] == [
        "joint[model.aspp_rates=[2, 4, 6]]", "joint[model.aspp_rates=[1, 2, 3]]",
    ]


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"variants": {"v": {"direction": "paper"}}}, ConfigError, r"\[variants\.v\]: needs method ="),
        ({"variants": {"Bad-Name": {"method": "cggm"}}}, ConfigError, r"snake_case, got 'Bad-Name'"),
        ({"variants": {"v": {"method": "w"}, "w": {"method": "cggm"}}}, ConfigError, r"another variant"),
        ({"variants": {"ogm_ge": {"method": "cggm"}}}, ConfigError, r"named like the registered method"),
        ({"variants": {"v": {"method": "cgm"}}}, RegistryError, r"\[variants\.v\] method: unknown method"),
        ({"variants": {"v": {"method": "cggm"}}, "method_overrides": {"v": {"rho": 1.0}}}, ConfigError,
         r"\[method_overrides\.v\] names a variant; put its keys in \[variants\.v\]"),
        ({"variants": {"v": {"method": "cggm", "rho": []}}}, ConfigError,
         r"v on synthetic_cls2: rho = \[\] sweeps no value"),
        ({"variants": {"v": {"method": "cggm", "rhoo": [1.0]}}}, ConfigError, r"unknown config key 'rhoo'"),
        ({"overrides": {"rho": [1.0, 1.0]}, "methods": ["cggm"]}, ConfigError, r"resolves to the same run"),
        ({"variants": "x"}, ConfigError, r"'variants' must hold one table per name"),
    ],
)
def test_bad_variants_and_grids_raise_naming_the_spec_and_the_key(extra, error, match):
    with pytest.raises(error, match=match) as info:
        plan_matrix(_spec(**extra))
    assert "test.toml" in str(info.value)


def test_labels_and_the_joint_a_row_is_compared_with():
    assert row_label("cggm", None, [("rho", 1.3), ("direction", None)]) == "cggm[rho=1.3, direction=none]"
    assert swept_items("unimodal[text, lr=0.01]") == ("lr=0.01",) and swept_items("unimodal[text]") == ()
    labels = {"joint", "joint[clip_grad_norm=0.8]"}
    assert reference_label("cggm[clip_grad_norm=0.8]", labels) == "joint[clip_grad_norm=0.8]"
    assert reference_label("cggm[rho=1.3]", labels) == "joint"  # joint is not swept over rho
    assert joint_of("cggm[clip_grad_norm=none]", labels) == "joint"
    means = {"unimodal[a, c=1]": 0.9, "unimodal[a]": 0.5, "m[c=1]": 0.8, "m": 0.6}
    # each row against the unimodal rows of its own swept values
    assert below_single_modality(means, True, 100.0, 1) == {"m[c=1]"}


def _row(label, seed, acc, method=None):
    return ResultRow.from_dict({
        "run_id": f"{abs(hash((label, seed))) % 16**12:012x}", "status": "ok",
        "method": method or label.split("[")[0],
        "label": label, "dataset": "synthetic_cls2", "task": "cls", "seed": seed, "config": {},
        "metrics": {"val": {"acc": acc}, "test": {"acc": acc}, "best_epoch": 0}, "history": [], "cost": {},
        "env": {}, "command": None,
    })


def test_tables_compare_a_grid_row_with_the_joint_row_of_the_same_swept_values():
    rows = [
        _row("joint[c=0]", 0, 0.5), _row("joint[c=0]", 1, 0.6),
        _row("joint[c=1]", 0, 0.8), _row("joint[c=1]", 1, 0.9),
        _row("m[c=0]", 0, 0.5), _row("m[c=0]", 1, 0.6),  # equal to its own joint
        _row("m[c=1]", 0, 0.7), _row("m[c=1]", 1, 0.8),
    ]
    assert identical_to_joint(rows, "test") == {"m[c=0]"}
    text = metric_table(rows, delta=True, metrics=["acc"])
    line = next(ln for ln in text.splitlines() if ln.startswith("| m[c=1]"))
    assert "-10.00" in line  # 0.75 - 0.85 (its joint), not 0.75 - 0.55


def test_a_planned_run_shows_under_the_plans_label():
    row = _row("cggm", 0, 0.7)
    plan = Plan((PlannedCell(row.run_id, "cggm_official[c=1]", "cggm", "synthetic_cls2", "cls", 0, False),))
    assert [r.label for r in plan.relabel([row, _row("joint", 0, 0.5)])] == ["cggm_official[c=1]", "joint"]
    text = metric_table([row], plan=plan, metrics=["acc"])
    assert "cggm_official[c=1]" in text and "| cggm " not in text


def test_a_matrix_writes_variant_and_grid_rows_under_their_labels(tmp_path):
    from mmbalance.matrix_run import run_matrix
    from mmbalance.results import load_rows

    tiny = {"max_train_batches": 1, "cost_steps": 0, "eval_modality_scores": False, **SETS}
    spec = _spec(
        overrides=tiny,
        variants={"cggm_paper": {"method": "cggm", "direction": "paper", "lam": [0.1, 0.2]}},
    )
    report = run_matrix(spec, tmp_path, quiet=True)
    assert not report.failed
    labels = sorted(r.label for r in load_rows(tmp_path).rows)
    assert labels == ["cggm_paper[lam=0.1]", "cggm_paper[lam=0.2]", "joint"]
    again = run_matrix(spec, tmp_path, quiet=True)  # the same runs: resumed, nothing trains
    assert again.skipped == 3
