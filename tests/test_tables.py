"""Tables: golden outputs (github, latex, csv, paper layout, comparisons) on rows written here, the
cell marks, splitting wide GitHub tables, and the LaTeX compiling with pdflatex where installed.

Regenerate the golden files after an intended format change with
``MMBALANCE_UPDATE_GOLDEN=1 python -m pytest tests/test_tables.py`` and review the diff.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mmbalance.errors import ConfigError
from mmbalance.results import PLAN_DIR, ResultRow, load_plan, load_rows, write_json_atomic, write_row
from mmbalance.tables import cost_table, metric_table, order_labels, render_tables
from tests.result_rows import make_row, run_id_for

GOLDEN = Path(__file__).parent / "golden"

FOOD = {0: (0.90, 0.89), 1: (0.91, 0.90), 2: (0.93, 0.92)}


def _rows() -> list[dict]:
    rows = []
    for s, (acc, f1) in FOOD.items():
        rows.append(make_row("joint", "food101", s, {"acc": acc, "f1_weighted": f1, "f1_macro": f1}))
        rows.append(
            make_row(
                "cggm",
                "food101",
                s,
                {"acc": acc + 0.01, "f1_weighted": f1 + 0.02, "f1_macro": f1},
                ratio=1.25 + 0.01 * s,
                mem=3 * 2**20,
            )
        )
    for s in (0, 1):
        rows.append(
            make_row(
                "unimodal[text]",
                "food101",
                s,
                {"acc": 0.80 + 0.02 * s, "f1_weighted": 0.79, "f1_macro": 0.7},
                ratio=0.6,
            )
        )
    rows.append(make_row("ogm_ge", "food101", 0, status="failed"))
    reg = {
        "mae": 0.80,
        "corr": 0.60,
        "acc2_has0": 0.75,
        "acc2_non0": 0.76,
        "acc2_cggm": 0.73,
        "f1_has0": 0.74,
        "f1_non0": 0.75,
        "f1_cggm": 0.72,
        "acc7": 0.30,
    }
    for s in (0, 1):
        rows.append(make_row("joint", "mosi", s, {k: v + 0.01 * s for k, v in reg.items()}, task="reg"))
    rows.append(
        make_row("cggm", "mosi", 0, {**reg, "mae": 0.747, "corr": None}, task="reg", ratio=1.3, mem=2**20)
    )
    rows.append(make_row("ogm_ge", "mosi", 0, task="reg", status="unsupported"))
    seg = {"dice_wt": 0.77, "dice_tc": 0.73, "dice_et": 0.72, "dice_mean": 0.74, "dice_mean_monai": 0.70}
    rows.append(make_row("joint", "brats2021", 0, seg, task="seg"))
    for s in (0, 1):
        rows.append(
            make_row("cggm", "brats2021", s, {k: v + 0.01 * s for k, v in seg.items()}, task="seg", ratio=1.1)
        )
    rows.append(make_row("joint", "synthetic_cls2", 0, {"acc": 0.5, "f1_weighted": 0.4, "f1_macro": 0.3}))
    return rows


def _plan() -> dict:
    """The matrix that produced the rows: ogm_ge listed first to show matrix order is kept."""
    entries = []
    layout = [
        ("food101", "cls", ["ogm_ge", "joint", "unimodal[text]", "cggm"], (0, 1, 2)),
        ("mosi", "reg", ["ogm_ge", "joint", "unimodal[text]", "cggm"], (0, 1)),
        ("brats2021", "seg", ["ogm_ge", "joint", "cggm"], (0, 1)),
        ("synthetic_cls2", "cls", ["joint"], (0,)),
    ]
    for dataset, task, labels, seeds in layout:
        for label in labels:
            for s in seeds:
                entries.append(
                    {
                        "run_id": run_id_for("plan", label, dataset, s),
                        "label": label,
                        "method": label.split("[")[0],
                        "dataset": dataset,
                        "task": task,
                        "seed": s,
                        "unsupported": label == "ogm_ge" and dataset == "mosi",
                    }
                )
    return {"runs": entries}


@pytest.fixture
def results_dir(tmp_path):
    for row in _rows():
        write_row(tmp_path, row)
    write_json_atomic(tmp_path / PLAN_DIR / "plan.json", _plan())
    return tmp_path


def _render(directory, **kwargs) -> str:
    loaded = load_rows(directory)
    assert loaded.problems == ()
    plan, problems = load_plan(directory)
    assert problems == ()
    return render_tables(loaded.rows, plan=plan, **kwargs)


def _comparison_rows() -> list[ResultRow]:
    """Rows made to exercise every comparison mark (3 seeds of a cls and a reg dataset)."""
    acc = {  # test accuracy per seed 0, 1, 2
        "joint": (0.90, 0.91, 0.92),
        "unimodal[weak]": (0.85, 0.86, 0.84),
        "unimodal[strong]": (0.47, 0.48, 0.46),
        "mses": (0.90, 0.91, 0.92),  # identical to joint in every metric: flagged (≡ joint)
        "cggm": (0.94, 0.96, 0.98),  # differences 4, 5, 6 points: significant
        "ogm_ge": (0.91, 0.90, 0.93),  # differences 1, -1, 1 points: not significant (†)
        "agm": (0.50, 0.55, 0.45),  # below unimodal[weak] (‡)
    }
    mae = {
        "joint": (0.56, 0.55, 0.57),
        "unimodal[text]": (0.70, 0.71, 0.72),
        "cggm": (0.74, 0.73, 0.75),
        "ogm_ge": (0.50, 0.52, 0.51),
        "mses": (0.56, 0.55, 0.57),
    }
    rows = []
    for label, values in acc.items():
        for seed, a in enumerate(values):
            rows.append(make_row(label, "synthetic_cls2", seed, {"acc": a, "f1_weighted": a - 0.01}))
    for label, values in mae.items():
        for seed, m in enumerate(values):
            rows.append(make_row(label, "synthetic_reg3", seed, {"mae": m, "corr": 0.8 - m / 10}, task="reg"))
    return [ResultRow.from_dict(r) for r in rows]


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MMBALANCE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with MMBALANCE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("tables_github.md", {"fmt": "github"}),  # wider than 100 characters: one table per dataset
        ("tables_github_wide.md", {"fmt": "github", "max_width": 0}),
        ("tables_latex.tex", {"fmt": "latex"}),
        ("tables.csv", {"fmt": "csv"}),
        ("tables_paper_github.md", {"fmt": "github", "layout": "paper"}),
        ("tables_paper_latex.tex", {"fmt": "latex", "layout": "paper"}),
    ],
)
def test_golden(results_dir, name, kwargs):
    _golden(name, _render(results_dir, **kwargs))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("tables_compare_github.md", {"fmt": "github", "delta": True, "cost": False}),
        ("tables_compare_latex.tex", {"fmt": "latex", "delta": True, "cost": False}),
        (
            "tables_compare_paper_github.md",
            {"fmt": "github", "layout": "paper", "delta": True, "cost": False},
        ),
    ],
)
def test_golden_comparisons(name, kwargs):
    _golden(name, render_tables(_comparison_rows(), **kwargs))


def test_comparison_marks(name="synthetic_cls2"):
    text = metric_table(_comparison_rows(), delta=True, max_width=0)
    table = _github_cells(text)
    header = table.pop("method")
    col = {h: i for i, h in enumerate(header)}
    acc, delta = col[f"{name} acc ↑"], col[f"{name} acc ↑"] + 1
    assert header[delta] == "Δ"
    # best bold, second italic, among the multimodal rows: cggm 96.00, then ogm_ge 91.33 (joint 91.00)
    assert table["cggm"][acc] == "**96.00 ± 2.00 (3)**"
    assert table["ogm_ge"][acc] == "_91.33 ± 1.53 (3)_"
    assert table["unimodal[weak]"][acc] == "85.00 ± 1.00 (3)"  # unimodal rows are not ranked
    # paired t-test, 2 degrees of freedom, where the two-sided p is 1 - |t| / sqrt(t^2 + 2):
    # cggm: d = 4, 5, 6 points, mean 5, sd 1, t = 5 / (1 / sqrt 3) = 8.66, p = 0.013 < 0.05
    assert table["cggm"][delta] == "+5.00"
    # ogm_ge: d = 1, -1, 1, mean 1/3, sd 1.155, t = 0.5, p = 1 - 0.5 / 1.5 = 0.667: not significant
    assert table["ogm_ge"][delta] == "+0.33†"
    assert table["joint"][delta] == ""
    # agm (50.00) is below the best single modality (unimodal[weak] 85.00): ‡
    assert table["agm"][acc] == "50.00 ± 5.00 (3)‡"
    # mses equals joint in every metric of every seed; its Δ is 0 and untested
    assert "mses (≡ joint)" in table and table["mses (≡ joint)"][delta] == "+0.00†"
    # lower is better for MAE: ogm_ge 0.510 best, joint and mses 0.560 share the second mark
    mae = col["synthetic_reg3 mae ↓"]
    assert table["ogm_ge"][mae] == "**0.510 ± 0.010 (3)**"
    assert table["joint"][mae] == "_0.560 ± 0.010 (3)_" == table["mses (≡ joint)"][mae]
    assert table["cggm"][mae] == "0.740 ± 0.010 (3)‡"  # worse than unimodal[text] 0.710
    assert table["cggm"][mae + 1] == "+0.180"  # d = 0.18 on every seed (up to float rounding): p ~ 0
    plain = _github_cells(metric_table(_comparison_rows(), marks=False, max_width=0))
    assert "mses" in plain and plain["cggm"][plain["method"].index(f"{name} acc ↑")] == "96.00 ± 2.00 (3)"


def _compile(tex: str, tmp_path: Path) -> None:
    document = (
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex + "\n\\end{document}\n"
    )
    (tmp_path / "tables.tex").write_text(document, encoding="ascii")
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "tables.pdf").stat().st_size > 1000


@pytest.mark.parametrize("name", ["tables_latex.tex", "tables_paper_latex.tex", "tables_compare_latex.tex"])
def test_golden_latex_is_ascii_and_compiles(name, tmp_path):
    tex = (GOLDEN / name).read_text(encoding="utf-8")
    assert tex.isascii() and "\\toprule" in tex and "\\hline" not in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("no LaTeX engine (pdflatex) installed; the golden file comparison still runs")
    _compile(tex, tmp_path)


def test_wide_github_tables_are_split_per_dataset(results_dir):
    split = _render(results_dir)
    table_lines = [ln for ln in split.splitlines() if ln.startswith("|")]
    assert max(map(len, table_lines)) <= 100
    assert [ln for ln in split.splitlines() if ln.startswith("**")] == [
        "**food101**",
        "**mosi**",
        "**brats2021**",
        "**synthetic_cls2**",  # metric tables
        "**food101**",
        "**mosi**",
        "**brats2021**",
        "**synthetic_cls2**",  # cost tables
    ]
    wide = _render(results_dir, max_width=0)
    assert max(len(ln) for ln in wide.splitlines() if ln.startswith("|")) > 100
    assert "**food101**" not in wide and "| food101 acc ↑" not in wide and "food101 acc ↑" in wide
    # a per-dataset table lists the labels of that dataset only (the plan has only joint on synthetic_cls2)
    last = split.split("**synthetic_cls2**", 1)[1].split("\n\n", 2)[1]
    assert [ln.split("|")[1].strip() for ln in last.splitlines()[2:]] == ["joint"]
    with pytest.raises(ConfigError, match="max_width must be an integer >= 0.*got -1"):
        _render(results_dir, max_width=-1)


def _github_cells(text: str) -> dict[str, list[str]]:
    """First markdown table of ``text`` as {method: cells}, plus the header under key 'method'."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    table: dict[str, list[str]] = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if set(cells[0]) <= {"-", ":"}:
            continue
        if cells[0] in table:
            break  # the next table starts
        table[cells[0]] = cells[1:]
    return table


def test_cells_marks_and_order(results_dir):
    loaded = load_rows(results_dir)
    plan, _ = load_plan(results_dir)
    table = _github_cells(metric_table(loaded.rows, plan=plan, marks=False, max_width=0))
    header = table.pop("method")
    assert list(table) == ["joint", "unimodal[text]", "ogm_ge", "cggm"]  # joint, unimodal, then matrix order
    col = {h: i for i, h in enumerate(header)}
    assert table["joint"][col["food101 acc ↑"]] == "91.33 ± 1.53 (3)"  # mean 91.33, sample std 1.53 (hand)
    assert table["unimodal[text]"][col["food101 acc ↑"]] == "81.00 ± 1.41 (2)"
    assert table["ogm_ge"][col["food101 acc ↑"]] == "x"  # failed
    assert table["ogm_ge"][col["mosi mae ↓"]] == "-"  # unsupported
    assert table["unimodal[text]"][col["mosi mae ↓"]] == "..."  # planned, absent
    assert table["unimodal[text]"][col["brats2021 dice_mean ↑"]] == "-"  # not in the matrix
    assert table["cggm"][col["mosi mae ↓"]] == "0.747 (1)"  # one seed: no std
    assert table["cggm"][col["mosi corr ↑"]] == "nan (1)"  # a stored null is shown, not hidden


def test_without_plan_every_seen_pair_is_expected(results_dir):
    rows = load_rows(results_dir).rows
    table = _github_cells(metric_table(rows, marks=False, max_width=0))
    header = table.pop("method")
    col = {h: i for i, h in enumerate(header)}
    assert list(table) == ["joint", "unimodal[text]", "cggm", "ogm_ge"]  # alphabetical after unimodal
    assert table["unimodal[text]"][col["brats2021 dice_mean ↑"]] == "..."
    assert table["ogm_ge"][col["mosi mae ↓"]] == "-"


def test_cost_table_caption_and_cells(results_dir):
    rows = load_rows(results_dir).rows
    text = cost_table(rows, max_width=0)
    assert "on cpu (x86_64, 1 threads)" in text.splitlines()[0]
    table = _github_cells(text)
    header = table.pop("method")
    col = {h: i for i, h in enumerate(header)}
    assert table["cggm"][col["food101 step-time ratio ↓"]] == "1.26 ± 0.01 (3)"
    assert table["cggm"][col["food101 mem MiB ↓"]] == "3.00 ± 0.00 (3)"
    assert table["ogm_ge"][col["food101 mem MiB ↓"]] == "x"


def test_mixed_devices_are_called_out(tmp_path):
    rows = [
        ResultRow.from_dict(make_row("joint", "food101", 0, {"acc": 0.9})),
        ResultRow.from_dict(
            make_row("joint", "food101", 1, {"acc": 0.9}, env={"device": "NVIDIA H100 80GB HBM3"})
        ),
    ]
    assert "MIXED devices (NVIDIA H100 80GB HBM3; cpu (x86_64, 1 threads))" in cost_table(rows)


def test_metrics_option_and_bad_options(results_dir):
    rows = load_rows(results_dir).rows
    table = _github_cells(metric_table(rows, metrics=["f1_macro", "acc7"], max_width=0))
    assert table["method"] == ["food101 f1_macro ↑", "mosi acc7 ↑", "synthetic_cls2 f1_macro ↑"]
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) 'accuracy' for --metrics; known: .*acc"):
        metric_table(rows, metrics=["accuracy"])
    with pytest.raises(ConfigError, match="format must be one of github, latex, csv; got 'html'"):
        render_tables(rows, fmt="html")
    with pytest.raises(ConfigError, match="layout must be one of default, paper; got 'wide'"):
        render_tables(rows, layout="wide")
    with pytest.raises(ConfigError, match="split must be one of test, val; got 'train'"):
        render_tables(rows, split="train")


def test_csv_is_tidy_and_machine_readable(results_dir):
    rows = list(csv.DictReader(io.StringIO(_render(results_dir, fmt="csv"))))
    joint_acc = next(
        r
        for r in rows
        if r["table"] == "metric"
        and r["method"] == "joint"
        and r["dataset"] == "food101"
        and r["metric"] == "acc"
    )
    assert (
        float(joint_acc["mean"]) == pytest.approx(0.91333333)
        and joint_acc["n"] == "3"
        and joint_acc["mark"] == ""
    )
    failed = next(
        r for r in rows if r["method"] == "ogm_ge" and r["dataset"] == "food101" and r["metric"] == "acc"
    )
    assert failed["mark"] == "x" and failed["mean"] == ""


def test_failed_runs_listed_under_the_tables(results_dir):
    text = _render(results_dir)
    failed = make_row("ogm_ge", "food101", 0, status="failed")["run_id"]
    assert f"x ogm_ge on food101, seed 0 (run {failed}): NonFiniteLossError: loss term 'task' is nan" in text


def test_order_labels():
    assert order_labels(["cggm", "unimodal[b]", "agm", "joint", "unimodal[a]"]) == [
        "joint",
        "unimodal[a]",
        "unimodal[b]",
        "agm",
        "cggm",
    ]
    assert order_labels(["cggm", "agm", "joint"], ["cggm", "agm"]) == ["joint", "cggm", "agm"]
