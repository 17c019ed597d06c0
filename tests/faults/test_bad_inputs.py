"""Bad input, as an adversarial user types it: each is one line on stderr naming the argument or the
file, exit status 2, no traceback, and the results folder byte-identical afterwards."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmbalance.datasets.fixtures import write_fixtures
from tests.faults.conftest import TINY_SET, TINY_SPEC, one_line_error, snapshot


@dataclass
class Ctx:
    out: Path
    tmp: Path
    spec: object  # the spec-writing fixture

    def run(self, method: str, dataset: str, *options: str) -> list[str]:
        """``mmbalance run`` of a tiny run; ``options`` come last, so they win over the tiny ones."""
        return ["run", method, dataset, *TINY_SET, *options, "--out", str(self.out)]

    def run_files(self, dataset: str, root: Path) -> list[str]:
        """``mmbalance run joint DATASET --data-root ROOT`` (datasets that read files)."""
        return [
            "run",
            "joint",
            dataset,
            "--data-root",
            str(root),
            "--set",
            "epochs=1",
            "--device",
            "cpu",
            "-q",
            "--out",
            str(self.out),
        ]

    def matrix(self, text: str = TINY_SPEC, *args: str, raw: bytes | None = None) -> list[str]:
        return ["matrix", str(self.spec(text, raw=raw)), "--out", str(self.out), "-q", "--no-tables", *args]


def _spec_with(line: str) -> str:
    """TINY_SPEC with ``line`` added before its [overrides] table."""
    return TINY_SPEC.replace("[overrides]", f"{line}\n\n[overrides]")


def _deep_row(ctx: Ctx) -> Path:
    path = ctx.tmp / "deep" / "0123456789ab.json"
    path.parent.mkdir()
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def _history_row(ctx: Ctx, history: object, name: str = "abcdefabcdef") -> Path:
    row = json.loads(next(ctx.out.glob("*.json")).read_text())
    row["run_id"], row["history"] = name, history
    path = ctx.tmp / "bad_rows" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(row))
    return path


def _truncated_iemocap(ctx: Ctx) -> Path:
    root = ctx.tmp / "fx"
    write_fixtures(root, names=["iemocap"])
    stats = root / "iemocap" / "A" / "comparE_mean_std.h5"
    data = stats.read_bytes()
    stats.write_bytes(data[: len(data) // 2])
    return stats


# (id, argv(ctx), fragments(ctx)): every fragment must be in the one error line.
CASES = [
    # -- config values of the wrong type or out of range --
    (
        "batch_size_bool",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "batch_size=true"),
        lambda c: ["batch_size must be an integer, got True (bool)"],
    ),
    (
        "seed_float",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "train.seed=1.5"),
        lambda c: ["seed must be an integer, got 1.5 (float)"],
    ),
    (
        "lr_bool",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "lr=true"),
        lambda c: ["lr must be a number, got True"],
    ),
    (
        "lr_word",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "lr=abc"),
        lambda c: ["lr must be a number, got 'abc' (str)"],
    ),
    (
        "lr_inf",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "lr=inf"),
        lambda c: ["lr must be > 0 and finite, got inf"],
    ),
    (
        "seed_negative",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "train.seed=-1"),
        lambda c: ["seed must be an integer in [0, 2**63), got -1"],
    ),
    (
        "seed_huge",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "train.seed=99999999999999999999"),
        lambda c: ["seed must be an integer in [0, 2**63)"],
    ),
    (
        "num_workers_negative",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "num_workers=-1"),
        lambda c: ["num_workers must be an integer >= 0, got -1"],
    ),
    (
        "deterministic_int",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "deterministic=3"),
        lambda c: ["deterministic must be true or false, got 3 (int)"],
    ),
    (
        "eval_scores_word",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "eval_modality_scores=yes"),
        lambda c: ["eval_modality_scores must be true or false, got 'yes' (str)"],
    ),
    (
        "max_batches_bool",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "max_train_batches=true"),
        lambda c: ["max_train_batches must be an integer or None, got True (bool)"],
    ),
    (
        "patience_float",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "plateau_patience=1.5"),
        lambda c: ["plateau_patience must be an integer, got 1.5 (float)"],
    ),
    (
        "final_lr_negative",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "final_lr=-1"),
        lambda c: ["final_lr must be >= 0 and finite, got -1"],
    ),
    (
        "warmup_start_lr_negative",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "warmup_start_lr=-1"),
        lambda c: ["warmup_start_lr must be >= 0 and finite, got -1"],
    ),
    (
        "optimizer_unknown",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "optimizer=rmsprop"),
        lambda c: ["optimizer must be one of ('adam', 'adamw', 'sgd'), got 'rmsprop'"],
    ),
    (
        "epochs_zero",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "epochs=0"),
        lambda c: ["epochs must be an integer >= 1, got 0"],
    ),
    (
        "divergence_factor_small",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "divergence_factor=0.5"),
        lambda c: ["divergence_factor must be None or > 1 and finite, got 0.5"],
    ),
    (
        "dataset_size_bool",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "dataset.n_train=true"),
        lambda c: ["invalid config for dataset 'synthetic_cls2'", "n_train must be an integer, got True"],
    ),
    (
        "model_width_float",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "model.hidden=1.5"),
        lambda c: ["invalid config for model 'small_mlp'", "hidden must be an integer, got 1.5"],
    ),
    (
        "model_dropout_range",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "model.dropout=2"),
        lambda c: ["dropout must be in [0, 1), got 2"],
    ),
    (
        "method_value_word",
        lambda c: c.run("ogm_ge", "synthetic_cls2", "--set", "alpha=abc"),
        lambda c: ["invalid config for method 'ogm_ge'", "alpha must be a number, got 'abc'"],
    ),
    # -- names and keys --
    (
        "unknown_key",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "epoch=1"),
        lambda c: ["unknown config key 'epoch'", "did you mean 'epochs'"],
    ),
    (
        "ambiguous_key",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "seed=1"),
        lambda c: ["config key 'seed' is ambiguous; use one of train.seed, dataset.seed"],
    ),
    (
        "unknown_prefix",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "optim.lr=1"),
        lambda c: ["override 'optim.lr': prefix must be one of"],
    ),
    (
        "set_without_value",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "epochs"),
        lambda c: ["--set expects key=value", "got 'epochs'"],
    ),
    (
        "set_spaces",
        lambda c: c.run("joint", "synthetic_cls2", "--set", "x=two words"),
        lambda c: ["--set value in 'x=two words' is not a TOML value"],
    ),
    (
        "unknown_method",
        lambda c: c.run("cgmm", "synthetic_cls2"),
        lambda c: ["unknown method 'cgmm'", "Did you mean 'cggm'"],
    ),
    (
        "unknown_dataset",
        lambda c: c.run("joint", "synthetic_cls9"),
        lambda c: ["unknown dataset 'synthetic_cls9'"],
    ),
    (
        "unknown_model",
        lambda c: c.run("joint", "synthetic_cls2", "--model", "resnet"),
        lambda c: ["unknown model 'resnet'"],
    ),
    (
        "unknown_preset",
        lambda c: c.run("joint", "synthetic_cls2", "--preset", "imagenet"),
        lambda c: ["unknown preset 'imagenet'"],
    ),
    (
        "unsupported_task",
        lambda c: c.run("pmr", "synthetic_seg4"),
        lambda c: ["method 'pmr' supports tasks ['cls']", "dataset 'synthetic_seg4' is task 'seg'"],
    ),
    (
        "device_unknown",
        lambda c: c.run("joint", "synthetic_cls2", "--device", "tpu"),
        lambda c: ["device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"],
    ),
    (
        "data_root_without_files",
        lambda c: c.run("joint", "synthetic_cls2", "--data-root", str(c.tmp)),
        lambda c: ["--data-root given, but dataset 'synthetic_cls2' reads no files"],
    ),
    # -- data files --
    (
        "dataset_files_missing",
        lambda c: c.run_files("mosi", c.tmp / "nothing"),
        lambda c: [str(c.tmp / "nothing")],
    ),
    (
        "iemocap_truncated_h5",
        lambda c: c.run_files("iemocap", _truncated_iemocap(c).parents[2]),
        lambda c: [
            str(c.tmp / "fx" / "iemocap" / "A" / "comparE_mean_std.h5"),
            "cannot be read as HDF5",
            "truncated",
        ],
    ),
    # -- the output folder --
    (
        "out_is_a_file",
        lambda c: ["run", "joint", "synthetic_cls2", *TINY_SET, "--out", str(next(c.out.glob("*.json")))],
        lambda c: ["--out", "is a file, expected a folder"],
    ),
    (
        "out_under_proc",
        lambda c: ["run", "joint", "synthetic_cls2", *TINY_SET, "--out", "/proc/mmbalance-x"],
        lambda c: ["--out: cannot create folder '/proc/mmbalance-x'"],
    ),
    (
        "matrix_out_is_a_file",
        lambda c: ["matrix", str(c.spec()), "--out", str(next(c.out.glob("*.json"))), "-q"],
        lambda c: ["--out", "is a file, expected a folder"],
    ),
    (
        "fixtures_into_a_file",
        lambda c: ["fixtures", str(next(c.out.glob("*.json")))],
        lambda c: ["fixtures DIR", "is a file, expected a folder"],
    ),
    # -- matrix specs --
    (
        "spec_missing",
        lambda c: ["matrix", str(c.tmp / "none.toml"), "--out", str(c.out)],
        lambda c: [str(c.tmp / "none.toml"), "cannot be read"],
    ),
    (
        "spec_not_utf8",
        lambda c: c.matrix(raw=b'methods = ["joint"]\n# caf\xe9\n'),
        lambda c: [str(c.tmp / "m.toml"), "is not UTF-8 text"],
    ),
    (
        "spec_not_toml",
        lambda c: c.matrix("methods = [joint\n"),
        lambda c: [str(c.tmp / "m.toml"), "is not valid TOML"],
    ),
    (
        "spec_unknown_key",
        lambda c: c.matrix(_spec_with("seed = 1")),
        lambda c: [str(c.tmp / "m.toml"), "unknown key(s) 'seed'"],
    ),
    (
        "spec_methods_string",
        lambda c: c.matrix(TINY_SPEC.replace('["joint", "unimodal"]', '"joint"')),
        lambda c: [str(c.tmp / "m.toml"), "'methods' must be a non-empty list of names"],
    ),
    (
        "spec_unknown_method",
        lambda c: c.matrix(TINY_SPEC.replace('"unimodal"', '"unimodel"')),
        lambda c: [str(c.tmp / "m.toml"), "unknown method 'unimodel'", "Did you mean 'unimodal'"],
    ),
    (
        "spec_negative_seed",
        lambda c: c.matrix(TINY_SPEC.replace("seeds = [0]", "seeds = [-1]")),
        lambda c: [str(c.tmp / "m.toml"), "'seeds' must be a non-empty list of integers >= 0"],
    ),
    (
        "spec_value_type",
        lambda c: c.matrix(TINY_SPEC + 'lr = "abc"\n'),
        lambda c: [
            str(c.tmp / "m.toml"),
            "joint on synthetic_cls2, seed 0",
            "lr must be a number, got 'abc'",
        ],
    ),
    (
        "spec_device_unknown",
        lambda c: c.matrix(TINY_SPEC.replace('device = "cpu"', 'device = "tpu"')),
        lambda c: [str(c.tmp / "m.toml"), "device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"],
    ),
    (
        "shard_beyond_runs",
        lambda c: c.matrix(TINY_SPEC, "--shard", "17/20"),
        lambda c: ["--shard 17/20 selects no run: the matrix has 3 run(s)"],
    ),
    (
        "shard_malformed",
        lambda c: c.matrix(TINY_SPEC, "--shard", "0/3"),
        lambda c: ["--shard must be K/N", "got '0/3'"],
    ),
    (
        "plan_folder_is_a_file",
        lambda c: _plan_folder_file(c),
        lambda c: [str(c.tmp / "o2" / "_matrix"), "is a file"],
    ),
    # -- rows: show / plot / table never crash on a malformed row, and name it --
    (
        "show_deep_row",
        lambda c: ["show", str(_deep_row(c))],
        lambda c: [str(c.tmp / "deep" / "0123456789ab.json"), "nested too deep"],
    ),
    (
        "show_history_not_objects",
        lambda c: ["show", str(_history_row(c, [1, "two"]))],
        lambda c: ["abcdefabcdef.json", "history[0] must be an object, got int"],
    ),
    (
        "show_history_value_type",
        lambda c: ["show", str(_history_row(c, [{"epoch": 0, "val": {"acc": "high"}}]))],
        lambda c: ["abcdefabcdef.json", "history[0].val.acc must be a number or null, got 'high'"],
    ),
    (
        "plot_malformed_row",
        lambda c: ["plot", str(_history_row(c, [[]]))],
        lambda c: ["abcdefabcdef.json", "history[0] must be an object, got list"],
    ),
    (
        "show_unknown_run",
        lambda c: ["show", "fedcba", "--out", str(c.out)],
        lambda c: ["no result file or run id 'fedcba'"],
    ),
    (
        "table_only_malformed",
        lambda c: ["table", str(_history_row(c, [1]).parent)],
        lambda c: [
            "no result rows in",
            "1 unreadable file(s) skipped",
            "abcdefabcdef.json: history[0] must be",
        ],
    ),
    # -- where and how runs execute --
    (
        "executor_unknown",
        lambda c: c.matrix(TINY_SPEC, "--executor", "dask"),
        lambda c: ["--executor must be one of local, ray, got 'dask'"],
    ),
    (
        "ray_option_with_local_executor",
        lambda c: c.matrix(TINY_SPEC, "--address", "auto", "--cpus-per-run", "2"),
        lambda c: ["--address, --cpus-per-run only apply to --executor ray, not --executor local"],
    ),
    (
        "gpus_per_run_negative",
        lambda c: c.matrix(TINY_SPEC, "--executor", "ray", "--gpus-per-run", "-1"),
        lambda c: ["--gpus-per-run must be a number >= 0 (a fraction below 1 shares a GPU), got '-1'"],
    ),
    (
        "gpus_per_run_word",
        lambda c: c.matrix(TINY_SPEC, "--executor", "ray", "--gpus-per-run", "one"),
        lambda c: ["--gpus-per-run must be a number >= 0", "got 'one'"],
    ),
    (
        "cpus_per_run_zero",
        lambda c: c.matrix(TINY_SPEC, "--executor", "ray", "--cpus-per-run", "0"),
        lambda c: ["--cpus-per-run must be an integer >= 1, got '0'"],
    ),
    (
        "cpus_per_run_fraction",
        lambda c: c.matrix(TINY_SPEC, "--executor", "ray", "--cpus-per-run", "1.5"),
        lambda c: ["--cpus-per-run must be an integer >= 1, got '1.5'"],
    ),
    (
        "max_in_flight_word",
        lambda c: c.matrix(TINY_SPEC, "--executor", "ray", "--max-in-flight", "many"),
        lambda c: ["--max-in-flight must be an integer >= 1, got 'many'"],
    ),
    (
        "claim_timeout_zero",
        lambda c: c.matrix(TINY_SPEC, "--claim-timeout", "0"),
        lambda c: ["--claim-timeout must be a number of seconds > 0, got '0'"],
    ),
    (
        "claim_timeout_word",
        lambda c: c.matrix(TINY_SPEC, "--claim-timeout", "10m"),
        lambda c: ["--claim-timeout must be a number of seconds > 0, got '10m'"],
    ),
    (
        "checkpoint_every_negative",
        lambda c: c.matrix(TINY_SPEC, "--checkpoint-every", "-1"),
        lambda c: ["--checkpoint-every must be 'auto' or an integer >= 0 (epochs; 0 = never), got '-1'"],
    ),
    (
        "checkpoint_every_word",
        lambda c: c.matrix(TINY_SPEC, "--checkpoint-every", "often"),
        lambda c: ["--checkpoint-every must be 'auto' or an integer >= 0", "got 'often'"],
    ),
    # -- resuming with another thread count --
    (
        "threads_differ_matrix",
        lambda c: ["--threads", "2", *c.matrix(TINY_SPEC.replace("seeds = [0]", "seeds = [0, 1]"))],
        lambda c: [
            f"results folder '{c.out}' holds CPU rows made with 1 intra-op thread(s)",
            "this command would run with 2",
            "--threads 1",
        ],
    ),
    (
        "threads_differ_run",
        lambda c: ["--threads", "2", *c.run("joint", "synthetic_cls2", "--seed", "5")],
        lambda c: ["holds CPU rows made with 1 intra-op thread(s)", "would run with 2"],
    ),
]


def _plan_folder_file(c: Ctx) -> list[str]:
    other = c.tmp / "o2"
    other.mkdir()
    (other / "_matrix").write_text("not a folder")
    return ["matrix", str(c.spec()), "--out", str(other), "-q", "--no-tables"]


def test_at_least_forty_distinct_faults():
    assert len({case_id for case_id, *_ in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("make_argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(make_argv, fragments, out, tmp_path, spec, capsys):
    ctx = Ctx(out=out, tmp=tmp_path, spec=spec)
    before = snapshot(out)
    argv = make_argv(ctx)
    capsys.readouterr()
    line = one_line_error(capsys, argv)
    for fragment in fragments(ctx):
        assert fragment in line, (fragment, line)
    assert snapshot(out) == before


def test_executor_ray_without_ray_names_the_extra_to_install(out, spec, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    before = snapshot(out)
    line = one_line_error(capsys, ["matrix", str(spec()), "--out", str(out), "-q", "--executor", "ray"])
    expected = "--executor ray needs the ray package, which is not installed: pip install 'mmbalance[ray]'"
    assert expected in line
    assert snapshot(out) == before
