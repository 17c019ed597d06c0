"""``mmbalance.testing.check_method`` and ``run_checks``: each check catches the bug it is for (one
deliberately broken method per check, in ``_broken``), failures name the method, the task, the
check and what differed, and bad arguments raise clear errors."""

from __future__ import annotations

import pytest

from mmbalance.errors import ConfigError, NonFiniteLossError, RegistryError
from mmbalance.testing import check_method, run_checks

from . import _broken

TASK = "synthetic_cls2"
CPU_CHECKS = [
    "finite_steps", "seeded_determinism", "grad_edit_scope", "state_round_trip", "weights_only_state",
    "stop_resume_finish",
]


def test_a_correct_method_passes_every_check_on_every_declared_task():
    report = check_method(_broken.HalveEncoders)
    assert report.passed and report.method == "HalveEncoders" and report.device == "cpu"
    assert report.tasks == ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"]
    assert [(r.task, r.check) for r in report.results] == [(t, c) for t in report.tasks for c in CPU_CHECKS]
    assert str(report).splitlines()[1].startswith("ok   HalveEncoders synthetic_cls2 finite_steps [")


def test_a_registered_name_with_options_and_chosen_tasks():
    report = check_method("ogm_ge", tasks=["synthetic_seg4"], options={"alpha": 0.8})
    assert report.method == "ogm_ge" and report.tasks == ["synthetic_seg4"] and len(report.results) == 6
    # options are checked once, before any check runs
    with pytest.raises(ConfigError, match="unknown config key 'no_such_key' for method 'ogm_ge'"):
        check_method("ogm_ge", tasks=[TASK], options={"no_such_key": 1})
    with pytest.raises(ConfigError, match="alpha"):
        check_method("ogm_ge", tasks=[TASK], options={"alpha": -1.0})


@pytest.mark.parametrize("broken, failing", [
    (_broken.HeadOutsideScope, {"grad_edit_scope"}),
    (_broken.UnseededNoise, {"seeded_determinism", "state_round_trip", "stop_resume_finish"}),
    (_broken.HiddenCounter, {"state_round_trip", "stop_resume_finish"}),
    (_broken.PickledHostState, {"weights_only_state", "stop_resume_finish"}),
    (_broken.ValidationMemory, {"stop_resume_finish"}),
])
def test_each_broken_method_fails_exactly_the_checks_for_its_bug(broken, failing):
    report = run_checks(broken, tasks=[TASK])
    assert [r.check for r in report.results] == CPU_CHECKS
    assert {r.check for r in report.results if not r.passed} == failing
    for r in report.results:
        if not r.passed:
            assert r.note.startswith(f"{broken.__qualname__} on {TASK}, check {r.check}: "), r.note


def test_check_method_raises_at_the_first_failure_naming_what_differed():
    with pytest.raises(AssertionError) as err:
        check_method(_broken.HeadOutsideScope, tasks=[TASK])
    assert str(err.value).startswith(
        "HeadOutsideScope on synthetic_cls2, check grad_edit_scope: edited gradients outside "
        "grad_edit_scope ['encoders']: ['head."
    )
    with pytest.raises(AssertionError, match="check state_round_trip: after a resume, the next step has "
                       "different gradients: .*grad.model.head"):
        check_method(_broken.HiddenCounter, tasks=[TASK])
    with pytest.raises(AssertionError, match=r"check stop_resume_finish: stopped, resumed and finished, "
                       r"the test differs"):
        check_method(_broken.ValidationMemory, tasks=[TASK])


def test_an_error_inside_a_check_becomes_an_assertion_chained_to_it():
    with pytest.raises(AssertionError, match="NanLoss on synthetic_cls2, check finite_steps: raised "
                       "NonFiniteLossError: ") as err:
        check_method(_broken.NanLoss, tasks=[TASK])
    assert isinstance(err.value.__cause__, NonFiniteLossError)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(RegistryError, match="unknown method 'ogm_gee'. Did you mean 'ogm_ge'"):
        check_method("ogm_gee")
    with pytest.raises(TypeError, match="must be a registered method name or a Balancer subclass, got 3"):
        check_method(3)
    with pytest.raises(ConfigError, match="tasks: 'synthetic_cls' is not a synthetic task; did you mean"):
        check_method("joint", tasks=["synthetic_cls"])
    with pytest.raises(ConfigError, match="method 'mla' does not declare 'synthetic_reg3' .task 'reg'"):
        check_method("mla", tasks=["synthetic_reg3"])
    with pytest.raises(ConfigError, match=r"method 'FiveModalities' declares none of the synthetic tasks .*"
                       r"5 to any modalities\): nothing to check"):
        check_method(_broken.FiveModalities)
    with pytest.raises(ConfigError, match="tasks must name at least one synthetic task"):
        check_method("joint", tasks=[])
    with pytest.raises(ConfigError, match="device must be a torch device such as 'cpu' or 'cuda', got 'gpu0"):
        check_method("joint", device="gpu0")
