"""The one-shot CUDA check behind ``benchmarks/cuda_check.sh``: everything goes to
``results/gpu/<device>/`` (``--out`` sets the parent folder).

Stages, in this order (``--stages`` picks some; finished parts are kept and skipped on a rerun):

1. ``env``: device name, driver, CUDA runtime, cuDNN and torch versions (``env.json``).
2. ``bench``: ``mmbalance bench`` on the paper-sized models (MOSI, IEMOCAP, BraTS, Food-101 shapes at
   the papers' batch sizes), fp32 and bf16, one command per model and AMP mode
   (``bench/<amp>/<case>.json``): every method's ``ratio_vs_joint``, FLOP floor and GPU memory
   overhead. Between them, ``streams``: CGGM with ``side_stream`` off and on at the MOSI, IEMOCAP and
   BraTS sizes (``streams/{off,on}.json``).
3. ``tests``: the ``gpu``-marked tests, including the CUDA pass of the contract tests over every
   method, in parallel processes (``tests/junit_*.xml``, ``tests/*.log``). The CPU rows of
   ``matrix`` are computed meanwhile, in the background.
4. ``matrix``: the default synthetic matrix (``matrices/default.toml``) for seed 0 on the device and
   on the CPU (``matrix/{device,cpu}/``), compared run by run (``matrix/compare.json``).
5. ``determinism``: a subset of those runs again on the device, compared bit for bit with the
   matrix rows (``determinism/``).
6. ``report``: ``README.md`` (tables in the project README's format) and ``summary.json``.

Time: ``--budget-s`` (default 570 s) bounds the whole check; a stage that cannot start within it is
recorded as skipped, one that runs over it is stopped and recorded as partial, and running the
script again completes what is missing. ``--dry-run`` runs the same stages on the CPU with tiny sizes
into a temporary folder (what CI runs, ``tests/test_cuda_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_report as report  # noqa: E402  (this folder is not a package)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "bench", "tests", "matrix", "determinism", "report")
AMP_LABEL = {"none": "fp32", "bf16": "bf16"}
DETERMINISM = {
    "methods": ("joint", "cggm", "ogm_ge"),
    "datasets": ("synthetic_cls3", "synthetic_reg3", "synthetic_seg4"),
}


# One bench command: (AMP mode or "streams:off" / "streams:on", comma-separated cases, its arguments).
Job = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True)
class Sizes:
    """What each stage runs: the full check on CUDA, or a tiny dry run on the CPU."""

    device: str
    early_jobs: tuple[Job, ...]  # bench commands before the tests (reserving ``reserve_s`` for them)
    late_jobs: tuple[Job, ...]  # bench commands after the determinism check, until the deadline
    contract_shards: int
    test_env: dict[str, str] = field(default_factory=dict)  # for the contract test's processes
    # the other gpu tests: (name, pytest arguments) per process
    other_tests: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("train", ("tests/test_train_cuda.py",)),
        (
            "other",
            ("tests", "--ignore=tests/test_train_cuda.py", "--ignore=tests/methods/test_contract_cuda.py"),
        ),
    )
    matrix_filter: dict[str, Any] = field(default_factory=dict)  # methods / datasets / overrides
    cpu_shards: int = 1
    device_shards: int = 1
    device_threads: int = 1
    reserve_s: float = 0.0  # kept after the early benches for tests, matrix and determinism


def full_sizes() -> Sizes:
    """Small models (MOSI, IEMOCAP: launch-bound steps of ~10-30 ms) get 10 timed steps, the large ones
    (BraTS: 4 x ResNet-101 at batch 64; Food-101: ViT-B + BERT at batch 128) 5: their steps take
    0.1-0.3 s with a small spread. The large ones run last, so that a first run within the budget
    has every other result, and a rerun completes them."""
    small, large = ("--steps", "10", "--warmup", "3"), ("--steps", "5", "--warmup", "2")
    streams = ("--methods", "cggm", "--steps", "20", "--warmup", "5")
    msa, brats = "paper_mosi,paper_iemocap", "paper_mosi,paper_iemocap,paper_brats"
    early = [
        ("none", msa, small),
        ("bf16", msa, small),
        ("streams:off", brats, streams),
        ("streams:on", brats, streams),
    ]
    late = [(amp, case, large) for case in ("paper_brats", "paper_food101") for amp in ("none", "bf16")]
    cores = os.cpu_count() or 2
    return Sizes(
        device="cuda",
        early_jobs=tuple(early),
        late_jobs=tuple(late),
        contract_shards=4,
        cpu_shards=max(1, min(8, cores // 2)),
        device_shards=4,
        device_threads=max(1, cores // 8),
        reserve_s=240.0,
    )


def dry_sizes() -> Sizes:
    tiny = ("--batch-size", "2", "--steps", "2", "--warmup", "1")
    bench, streams = ("--methods", "cggm,ogm_ge,mrd", *tiny), ("--methods", "cggm", *tiny)
    return Sizes(
        device="cpu",
        early_jobs=(
            ("none", "paper_mosi", bench),
            ("streams:off", "paper_mosi", streams),
            ("streams:on", "paper_mosi", streams),
        ),
        late_jobs=(("bf16", "paper_mosi", bench),),
        contract_shards=1,
        test_env={"MMB_TEST_DEVICE": "cpu", "MMB_TEST_METHODS": "cggm"},
        matrix_filter={
            "methods": ["joint", "cggm"],
            "datasets": ["synthetic_cls2"],
            "overrides": {
                "epochs": 1,
                "cost_steps": 2,
                "cost_warmup": 1,
                "dataset.n_train": 64,
                "dataset.n_val": 32,
                "dataset.n_test": 32,
            },
        },
    )


class Check:
    """Runs the stages under one deadline; every command's output goes to a log file in the folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = dry_sizes() if args.dry_run else full_sizes()
        self.deadline = time.monotonic() + args.budget_s
        parent = (
            Path(args.out)
            if args.out
            else (Path(tempfile.mkdtemp(prefix="cuda_check_")) if args.dry_run else ROOT / "results" / "gpu")
        )
        self.parent = parent
        self.out = parent  # becomes parent/<device> once the env stage knows the device
        self.summary: dict[str, Any] = {
            "dry_run": args.dry_run,
            "stages": {},
            "command": " ".join(
                ["benchmarks/cuda_check.sh", *(["--dry-run"] if args.dry_run else []), *args.passthrough]
            ),
        }
        self.background: list[subprocess.Popen] = []
        self._bench_notes: list[str] = []
        self._bench_wall = 0.0

    # -- processes ---------------------------------------------------------------------------------
    def remaining(self, reserve: float = 0.0) -> float:
        return self.deadline - time.monotonic() - reserve

    def start(self, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("w")
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        return subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait(self, procs: Sequence[subprocess.Popen], reserve: float = 0.0) -> list[int | None]:
        """Wait for ``procs`` until the deadline minus ``reserve``; kill those still running (rc None)."""
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, self.remaining(reserve))))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                codes.append(None)
        return codes

    def run(
        self, cmd: Sequence[str], log: Path, reserve: float = 0.0, env: dict[str, str] | None = None
    ) -> int | None:
        return self.wait([self.start(cmd, log, env)], reserve)[0]

    def cli(self, *args: str, threads: int | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mmbalance.cli",
            *(["--threads", str(threads)] if threads else []),
            *args,
        ]

    def record(self, stage: str, status: str, started: float, note: str = "") -> None:
        self.summary["stages"][stage] = {"status": status, "wall_s": time.monotonic() - started, "note": note}
        self.write_json("summary.json", self.summary)

    def write_json(self, name: str, obj: Any) -> None:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True) + "\n")

    # -- stages ------------------------------------------------------------------------------------
    def stage_env(self) -> None:
        """The environment, read in a child process (this one never initialises CUDA); the folder
        ``<out>/<device>``, and what an earlier run there recorded."""
        t0 = time.monotonic()
        code = (
            f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cuda_report; "
            f"print(json.dumps(cuda_report.environment({self.sizes.device!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            problem = out.stderr[-2000:]
            raise SystemExit(f"cuda_check: cannot read the {self.sizes.device} environment:\n{problem}")
        env = json.loads(out.stdout.strip().splitlines()[-1])
        self.out = self.parent / report.slug(env["device"] if self.sizes.device == "cuda" else "cpu")
        previous = self.out / "summary.json"
        if previous.is_file():  # a rerun: keep what earlier runs recorded for the stages not run now
            self.summary = {**json.loads(previous.read_text()), **self.summary}
            self.summary["stages"] = json.loads(previous.read_text()).get("stages", {})
        self.summary["env"] = env
        self.write_json("env.json", env)
        self.record("env", "ok", t0)

    def _done(self, path: Path) -> bool:
        try:
            return not json.loads(path.read_text()).get("failed")
        except (OSError, json.JSONDecodeError):
            return False

    def stage_bench(self, jobs: Sequence[Job], reserve: float) -> None:
        """One ``mmbalance bench`` command per job, while ``reserve`` seconds remain beyond it; a job
        whose report exists without failures is done."""
        t0 = time.monotonic()
        for kind, cases, options in jobs:
            if kind.startswith("streams:"):
                setting = kind.split(":")[1]
                path = self.out / "streams" / f"{setting}.json"
                flag = "true" if setting == "on" else "false"
                args = ("--tasks", cases, *options, "--set", f"side_stream={flag}")
            else:
                path = self.out / "bench" / AMP_LABEL[kind] / f"{cases}.json"
                args = ("--tasks", cases, "--amp", kind, *options)
            name = str(path.relative_to(self.out))
            if self._done(path):
                continue
            if self.remaining(reserve) < 30:
                self._bench_notes.append(f"{name}: not run (time budget)")
                continue
            cmd = self.cli("bench", "--device", self.sizes.device, *args, "--out", str(path), "--quiet")
            rc = self.run(cmd, path.with_suffix(".log"), reserve=reserve)
            if rc is None:
                self._bench_notes.append(f"{name}: stopped (time budget)")
            elif rc != 0:
                self._bench_notes.append(f"{name}: exit {rc} (failed pairs in the report)")
        self._bench_wall += time.monotonic() - t0  # both phases of this run
        status = "partial" if self._bench_notes else "ok"
        self.record("bench", status, time.monotonic() - self._bench_wall, "; ".join(self._bench_notes))

    def matrix_specs(self) -> tuple[Path, Path]:
        """Seed 0 of ``matrices/default.toml`` (filtered in a dry run), and its determinism subset."""
        spec = tomllib.loads((ROOT / "matrices" / "default.toml").read_text())
        spec.pop("device", None)
        spec["seeds"] = [0]
        keep = self.sizes.matrix_filter
        if keep:
            spec["methods"], spec["datasets"] = keep["methods"], keep["datasets"]
            spec["overrides"] = {**spec.get("overrides", {}), **keep["overrides"]}
            spec["dataset_overrides"] = {}
        subset = dict(spec)
        subset["methods"] = [m for m in spec["methods"] if m in DETERMINISM["methods"]] or spec["methods"]
        subset["datasets"] = [d for d in spec["datasets"] if d in DETERMINISM["datasets"]] or spec["datasets"]
        paths = (self.out / "matrix" / "spec.toml", self.out / "determinism" / "spec.toml")
        for path, body in zip(paths, (spec, subset), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report.matrix_toml(body))
        return paths

    def start_cpu_rows(self, spec: Path) -> None:
        n = self.sizes.cpu_shards
        for k in range(1, n + 1):
            cmd = self.cli(
                "matrix",
                str(spec),
                "--device",
                "cpu",
                "--out",
                str(self.out / "matrix" / "cpu"),
                "--shard",
                f"{k}/{n}",
                "-q",
                "--no-tables",
                threads=1,
            )
            self.background.append(self.start(cmd, self.out / "matrix" / f"cpu_{k}.log"))

    def stage_tests(self) -> None:
        """One pytest process per contract shard and per entry of ``other_tests``; a process whose
        JUnit file exists from an earlier run is not run again."""
        t0, folder = time.monotonic(), self.out / "tests"
        n = self.sizes.contract_shards
        jobs = [
            (
                f"contract_{k}",
                ["tests/methods/test_contract_cuda.py"],
                {**self.sizes.test_env, "MMB_TEST_SHARD": f"{k}/{n}"},
            )
            for k in range(1, n + 1)
        ]
        jobs += [(name, list(paths), {}) for name, paths in self.sizes.other_tests]
        pytest = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE"]
        started = {}
        for name, paths, env in jobs:
            if not (folder / f"junit_{name}.xml").is_file():
                cmd = [*pytest, f"--junitxml={folder / f'junit_{name}.xml'}", *paths]
                started[name] = self.start(cmd, folder / f"{name}.log", env)
        codes = dict(zip(started, self.wait(list(started.values()), reserve=60), strict=True))
        summary = report.junit_summary(sorted(folder.glob("junit_*.xml")))
        self.summary["tests"] = summary
        failed = summary["failed"] + summary["errors"]
        broken = [
            f"{name}: pytest exit {rc} (tests/{name}.log)"
            for name, rc in codes.items()
            if rc is not None and rc not in (0, 1)
        ]
        note = f"{summary['passed']} passed, {failed} failed, {summary['skipped']} skipped"
        note += f", {summary['xfailed']} xfailed" + "".join(f"; {b}" for b in broken)
        status = "partial" if None in codes.values() else ("failed" if failed or broken else "ok")
        self.record("tests", status, t0, note)

    def stage_matrix(self, spec: Path) -> None:
        t0 = time.monotonic()
        n, device_dir = self.sizes.device_shards, self.out / "matrix" / "device"
        procs = [
            self.start(
                self.cli(
                    "matrix",
                    str(spec),
                    "--device",
                    self.sizes.device,
                    "--out",
                    str(device_dir),
                    "--shard",
                    f"{k}/{n}",
                    "-q",
                    "--no-tables",
                    threads=self.sizes.device_threads,
                ),
                self.out / "matrix" / f"device_{k}.log",
            )
            for k in range(1, n + 1)
        ]
        codes = self.wait(procs, reserve=45) + self.wait(self.background, reserve=45)
        self.background = []
        cmp = report.compare_rows(report.load_rows(device_dir), report.load_rows(self.out / "matrix" / "cpu"))
        self.write_json("matrix/compare.json", cmp)
        self.summary["matrix"] = {
            k: cmp[k] for k in ("runs_compared", "ok_runs", "best_epoch_same", "max_abs_diff")
        }
        note = f"{cmp['runs_compared']} runs compared, largest metric difference {cmp['max_abs_diff']:.3g}"
        if any(rc not in (0, None) for rc in codes):
            note += "; a matrix command exited non-zero (matrix/*.log; 1: a run failed, see its row)"
        status = "partial" if None in codes else ("ok" if cmp["runs_compared"] else "failed")
        self.record("matrix", status, t0, note)

    def stage_determinism(self, subset: Path) -> None:
        t0 = time.monotonic()
        rerun = self.out / "determinism" / "rerun"
        reference = self.out / "matrix" / "device"
        cmd = self.cli(
            "matrix",
            str(subset),
            "--device",
            self.sizes.device,
            "--out",
            str(rerun),
            "-q",
            "--no-tables",
            threads=self.sizes.device_threads,
        )
        rc = self.run(cmd, self.out / "determinism" / "rerun.log", reserve=15)
        rerun_rows = report.load_rows(rerun)
        if not set(rerun_rows) <= set(report.load_rows(reference)):  # no matrix rows to compare: run twice
            reference = self.out / "determinism" / "reference"
            cmd = [*cmd[: cmd.index("--out") + 1], str(reference), *cmd[cmd.index("--out") + 2 :]]
            rc = (
                self.run(cmd, self.out / "determinism" / "reference.log", reserve=15)
                if rc is not None
                else None
            )
        result = report.determinism(rerun_rows, report.load_rows(reference))
        self.write_json("determinism/result.json", result)
        note = f"{len(result['identical'])} of {result['compared']} runs identical"
        status = (
            "partial"
            if rc is None
            else ("ok" if not result["different"] and result["compared"] else "failed")
        )
        self.record("determinism", status, t0, note)

    def stage_report(self) -> None:
        t0 = time.monotonic()
        sections = report.build_sections(self.out, self.summary)
        self.record("report", "ok", t0)
        (self.out / "README.md").write_text(report.render_readme(self.summary, sections))

    def main(self) -> int:
        stages = self.args.stages
        self.stage_env()
        specs = self.matrix_specs()
        if "bench" in stages:
            self.stage_bench(self.sizes.early_jobs, self.sizes.reserve_s)
        if "matrix" in stages:
            self.start_cpu_rows(specs[0])
        if "tests" in stages:
            self.stage_tests()
        if "matrix" in stages:
            self.stage_matrix(specs[0])
        if "determinism" in stages:
            self.stage_determinism(specs[1])
        if "bench" in stages:
            self.stage_bench(self.sizes.late_jobs, reserve=5.0)
        self.wait(self.background)
        self.stage_report()
        print(f"cuda_check: results in {self.out}", flush=True)
        bad = [s for s, info in self.summary["stages"].items() if info["status"] not in ("ok",)]
        if bad:
            print(f"cuda_check: not ok: {', '.join(bad)} (see {self.out / 'README.md'})", file=sys.stderr)
        return 1 if bad else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same stages on the CPU, tiny sizes, temporary folder"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu = --dry-run")
    parser.add_argument(
        "--out", help="parent folder of <device>/ (default results/gpu; dry run: a temporary folder)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=570.0, help="wall-clock bound of the whole check (570)"
    )
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.dry_run = args.dry_run or args.device == "cpu"
    args.passthrough = [a for a in argv if a != "--dry-run"]
    args.stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = args.stages - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return args


if __name__ == "__main__":
    sys.exit(Check(parse_args()).main())
