"""Every sentence of the README's "What happens when things go wrong" is backed by named tests."""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each README bullet (by its opening words) -> the tests that check what it says.
BACKED_BY = {
    "A killed matrix resumes where it stopped": [
        "tests.test_matrix:test_sigkill_then_resume_matches_uninterrupted",
        "tests.faults.test_kill:test_sigkill_inside_the_atomic_write_leaves_no_stray_file_after_the_next_run",
    ],
    "`run` and `matrix` check that they can write into `--out` before they train": [
        "tests.faults.test_disk:test_read_only_folder_fails_before_training",
        "tests.faults.test_disk:test_full_disk_ends_the_matrix_with_one_line_keeping_what_was_written",
        "tests.test_output:test_write_failure_names_path_and_errno_and_leaves_nothing",
    ],
    "A matrix whose runs are all done only reads its folder": [
        "tests.faults.test_disk:test_read_only_folder_of_a_finished_matrix_still_prints_its_tables",
    ],
    "Bad input": [
        "tests.faults.test_bad_inputs:test_bad_input_is_one_line_and_changes_nothing",
        "tests.faults.test_bad_inputs:test_at_least_forty_distinct_faults",
    ],
    "`show` and `plot` name a malformed row's file": [
        # the show_* and plot_* cases
        "tests.faults.test_bad_inputs:test_bad_input_is_one_line_and_changes_nothing",
        "tests.test_cli:test_table_reports_corrupt_json_and_goes_on",
    ],
    "A run whose loss rises above `divergence_factor`": [
        "tests.faults.test_failures:test_divergence_bound_by_hand",
        "tests.faults.test_failures:test_exploding_loss_is_a_diverged_row_shown_in_show_and_table",
        "tests.faults.test_failures:test_a_diverged_run_is_not_redone_on_resume",
        "tests.test_cli:test_matrix_command_prints_tables_and_records_failures",  # a NaN loss
    ],
    "A run that raises, or whose method calls `sys.exit`": [
        "tests.faults.test_failures:test_sys_exit_in_a_method_is_a_failed_run_and_the_matrix_goes_on",
        "tests.faults.test_failures:test_ctrl_c_stops_the_matrix_keeping_finished_rows",
        "tests.test_matrix:test_run_resume_failures_and_retries",
    ],
    "On CPU, results differ in their last bits between thread counts": [
        # the threads_differ_* cases
        "tests.faults.test_bad_inputs:test_bad_input_is_one_line_and_changes_nothing",
    ],
}


def _section() -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split("## What happens when things go wrong", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in body.splitlines() if line.startswith("- ")]


def test_every_bullet_is_one_sentence_backed_by_existing_tests():
    bullets = _section()
    assert len(bullets) == len(BACKED_BY)
    for bullet, (opening, tests) in zip(bullets, BACKED_BY.items(), strict=True):
        assert bullet.startswith(opening), (bullet, opening)
        assert bullet.endswith(".") and bullet.count(". ") == 0, f"one sentence per bullet: {bullet}"
        for test in tests:
            module, name = test.split(":")
            assert callable(getattr(importlib.import_module(module), name, None)), test


def test_the_thread_and_read_cases_are_in_the_fault_list():
    from tests.faults.test_bad_inputs import CASES

    ids = {case_id for case_id, *_ in CASES}
    assert {"threads_differ_matrix", "threads_differ_run", "show_deep_row", "plot_malformed_row"} <= ids
