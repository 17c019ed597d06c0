"""The contract suite every balancing method must pass, shipped with the package.

A plugin author checks a new method without this repository's tests, as scikit-learn's
``check_estimator`` checks an estimator::

    from mmbalance.testing import check_method
    check_method("my_method")            # or the Balancer subclass itself

or from the shell: ``python -m mmbalance.testing my_method [--tasks synthetic_cls2 ...]``.

For every synthetic task the method declares (or those given), :func:`check_method` runs: three
finite training steps; seeded determinism; gradient edits confined to ``grad_edit_scope``; a
checkpoint inside an epoch that continues exactly like the uninterrupted run (gradients and full
state); a training state that ``torch.load(weights_only=True)`` reads unchanged; and a ``fit``
stopped after an epoch, resumed from its epoch checkpoint and finished that equals the ``fit`` run
straight through. The project's own tests (``tests/methods/test_contract*.py``) parametrise these
same check functions over the registry. Each check raises AssertionError naming the method, the
task, the check and what differed. Importing this module needs no test framework.
"""

from __future__ import annotations

from mmbalance.testing._compare import differences
from mmbalance.testing._setup import (
    SYNTHETIC_TASKS,
    Subject,
    contract_trainer,
    declared_tasks,
    run_steps,
    start_epoch,
    subject,
)
from mmbalance.testing.checks import (
    check_finite_steps,
    check_grad_edit_scope,
    check_no_host_sync,
    check_seeded_determinism,
    off_device,
)
from mmbalance.testing.resume import (
    check_state_round_trip,
    check_stop_resume_finish,
    check_weights_only_state,
)
from mmbalance.testing.suite import AMP_MODES, CheckResult, ContractReport, check_method, run_checks

__all__ = [
    "AMP_MODES",
    "SYNTHETIC_TASKS",
    "CheckResult",
    "ContractReport",
    "Subject",
    "check_finite_steps",
    "check_grad_edit_scope",
    "check_method",
    "check_no_host_sync",
    "check_seeded_determinism",
    "check_state_round_trip",
    "check_stop_resume_finish",
    "check_weights_only_state",
    "contract_trainer",
    "declared_tasks",
    "differences",
    "off_device",
    "run_checks",
    "run_steps",
    "start_epoch",
    "subject",
]
