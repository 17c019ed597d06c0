"""The command line starts without torch, `list` reads a generated catalog that matches the
registries, `matrix` checks the data before the first run, and a user error shows its cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.catalog import DATA_FILE, build, render_data
from mmbalance.cli import main
from mmbalance.cli_support import cause_text as _cause
from mmbalance.errors import DataError, RegistryError
from mmbalance.matrix import check_data, missing_data, parse_spec, plan_matrix

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalog_is_the_registries():
    """`python -m mmbalance.catalog` regenerates mmbalance/_catalog_data.py after a registry change."""
    assert DATA_FILE.read_text(encoding="utf-8") == render_data(build())


def _fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


ARGVS = [
    ["--version"], ["--help"], ["list"], ["list", "--kind", "methods", "--task", "seg"], ["matrix", "--help"],
    ["bench", "--help"],
]


@pytest.mark.parametrize("argv", ARGVS)
def test_commands_that_do_not_train_do_not_import_torch(argv):
    heavy = argv[0] == "bench"  # bench's options come from its module, which imports torch
    out = _fresh(
        "import sys\nfrom mmbalance.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    assert out.rstrip().endswith(f"TORCH {heavy}"), out[-300:]
    if argv == ["list"]:
        assert "cggm" in out and "synthetic_seg4" in out and "small_mlp" in out
    if argv == ["bench", "--help"]:
        assert "``" not in out and "--seed SEED" in out and "csv" in out


def test_list_from_the_catalog_equals_list_from_the_registries(capsys):
    static = _fresh("from mmbalance.cli import main\nmain(['list'])\n")
    assert main(["list"]) == 0  # in this process the registries are imported: read live
    assert capsys.readouterr().out == static


def _spec(**extra):
    data = {"methods": ["joint"], "datasets": ["synthetic_cls2", "mosi", "iemocap"], "seeds": [0, 1]}
    return parse_spec({**data, **extra}, "data.toml")


def test_matrix_data_check_lists_everything_missing_once(tmp_path):
    assert missing_data(plan_matrix(_spec())) == [
        "dataset 'mosi': no data root (pass --data-root DIR or set data_root in the spec)",
        "dataset 'iemocap': no data root (pass --data-root DIR or set data_root in the spec)",
    ]
    (tmp_path / "mosi").mkdir()
    runs = plan_matrix(_spec(datasets=["mosi", "iemocap"]), data_root=str(tmp_path))
    missing = missing_data(runs)
    pickle = str(tmp_path / "mosi" / "mosi_data.pkl")
    assert missing[0] == f"dataset 'mosi': missing file {pickle!r} (the mult pickle of CMU-MOSI)"
    assert missing[1] == f"dataset 'iemocap': data folder {str(tmp_path / 'iemocap')!r} does not exist"
    assert len(missing) == 2
    with pytest.raises(DataError, match=r"data\.toml: data missing for the runs to do, nothing was run: "):
        check_data(runs, "data.toml")
    check_data([r for r in plan_matrix(_spec()) if r.dataset == "synthetic_cls2"], "data.toml")  # in memory


def test_matrix_command_stops_before_the_first_run(tmp_path, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text('methods = ["joint"]\ndatasets = ["mosi", "iemocap"]\nseeds = [0, 1]\n')
    (tmp_path / "mosi").mkdir()
    assert main(["matrix", str(spec), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was run" in err[0], err
    assert "'mosi': missing file" in err[0] and "'iemocap': data folder" in err[0]
    assert not (tmp_path / "out").exists()


def test_spec_help_prints_the_format(capsys):
    with pytest.raises(SystemExit) as info:
        main(["matrix", "--spec-help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "[variants.cggm_paper]" in out and "[method_overrides.cggm]" in out and "matrices/README.md" in out


def test_a_user_errors_cause_is_named_with_where_it_was_raised():
    def plugin_import():
        raise ModuleNotFoundError("No module named 'missing_dep'")

    try:
        try:
            plugin_import()
        except ImportError as exc:
            raise RegistryError("method plugin 'p' (p_mod) failed to import") from exc
    except RegistryError as err:
        text = _cause(err)
    assert text.startswith(" [cause: ModuleNotFoundError: No module named 'missing_dep', at ")
    assert f"{Path(__file__).name}:" in text
    assert _cause(RegistryError("no cause")) == ""


def test_bench_prints_csv_like_table():
    import csv

    from mmbalance.bench import format_table

    result = {
        "method": "cggm", "task": "synthetic_cls2", "ratio_vs_joint": 2.5, "floor": 1.8,
        "step_ms_median": 2.0, "step_ms_iqr": 0.1, "joint_step_ms_median": 0.8, "joint_step_ms_iqr": 0.05,
        "mem_overhead_bytes": 2**20,
    }
    report = {"results": [result], "env": {"device": "cpu", "torch": "2", "device_type": "cpu"},
              "config": {"amp": "none"}}
    lines = format_table(report, "csv").splitlines()
    table = list(csv.reader(lines[:-1]))
    assert table[0][:4] == ["method", "task", "epoch", "ratio vs joint [95% CI]"]
    assert table[1][:2] == ["cggm", "synthetic_cls2"] and table[1][3].startswith("2.5")
    assert lines[-1].startswith("# Device: cpu")
