"""CGGM's training step, official code against mmbalance, side by side in one process (CPU).

    git clone https://github.com/zrguo/CGGM /path/to/CGGM          # not part of this repository
    python results/cost/official_vs_mmbalance.py --official /path/to/CGGM
    python results/cost/official_vs_mmbalance.py --official /path/to/CGGM --profile   # + where time goes
    python results/cost/official_vs_mmbalance.py --official /path/to/CGGM --only mmbalance   # a control

Four contestants per shape (MOSI: text (50, 768), audio (50, 5), vision (50, 20), regression;
IEMOCAP: text (22, 1024), audio (350, 130), vision (50, 342), 4 classes), batch 64, random inputs:

* ``official cggm`` / ``official none``: the official ``src/msatrain.py::train_model`` loop itself,
  ``--modulation cggm`` / ``none``, with the official ``models/msamodel.py`` MSAModel and
  ClassifierGuided built as ``msatrain.initiate`` builds them, from the argparse defaults of
  ``run/mosi_run.py`` / ``run/iemo_run.py``. ``train_model`` runs in a thread of its own and reads
  its batches from a loader that hands over control after every step, so its own per-step code
  (``model.zero_grad`` ... ``optimizer.step``, ``.item()`` included) is what is timed;
* ``mmbalance cggm`` / ``mmbalance joint``: :class:`mmbalance.train.Trainer` steps of ``cggm`` with
  the dataset's preset (``mosi`` / ``iemocap``) and of ``joint``, on the MulT model of the same
  preset and the training preset's setup (Adam 1e-3, clip 0.8), run in a worker thread as the
  official loops are (see :func:`measure`: the main thread's allocator behaves differently).

Each round steps every contestant once, in a rotating order, on the same batch; one intra-op
thread (``--threads``). ``--only official`` / ``--only mmbalance`` builds and times one side alone
(does sharing the process change a side's timings?). ``--profile`` adds torch.profiler tables: the
operators of mmbalance's CGGM step, and per operator the difference between mmbalance's CGGM and
joint steps and between the official ``none`` step and mmbalance's joint step. Printed: median
and IQR of step times, each CGGM's ratio to its own baseline, mmbalance's CGGM step over the
official one (target <= 0.8), and the FLOP floor (FLOPs of a mmbalance CGGM step over a joint
step: the ratio its own extra work explains; target: the measured ratio within 2 % of it).

Two adaptations, both outside the timed step: ``initiate`` is replaced by the same construction
without ``ReduceLROnPlateau(verbose=True)`` (the argument is gone from current torch; the scheduler
only acts between epochs), and when ``einops`` is not installed an import-only stand-in is used
(``rearrange`` serves only the segmentation metrics, never this step); the script says so.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = {  # (dataset, modalities in the official order text/audio/vision, outputs, run-script defaults)
    "mosi": ({"text": (50, 768), "audio": (50, 5), "vision": (50, 20)}, 1,
             {"attn_dropout": 0.15, "relu_dropout": 0.15, "embed_dropout": 0.2, "res_dropout": 0.1,
              "out_dropout": 0.1, "nlevels": 5, "criterion": "L1Loss", "dataset": "mosi"}),
    "iemocap": ({"text": (22, 1024), "audio": (350, 130), "vision": (50, 342)}, 4,
                {"attn_dropout": 0.15, "relu_dropout": 0.15, "embed_dropout": 0.2, "res_dropout": 0.15,
                 "out_dropout": 0.2, "nlevels": 4, "criterion": "CrossEntropyLoss", "dataset": "iemo"}),
}
COMMON = {"cls_layers": 2, "num_heads": 5, "proj_dim": 40, "batch_size": 64, "clip": 0.8, "lr": 1e-3,
          "cls_lr": 5e-4, "optim": "Adam", "num_epochs": 30, "when": 10, "rou": 1.3, "lamda": 0.2,
          "seed": 666}


Profile = dict[str, tuple[float, int]]  # operator -> (self CPU ms, calls) per step


def per_step(prof: Any, steps: int) -> Profile:
    """A finished torch.profiler's self CPU ms and calls per step of every operator."""
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()}


def _profiled(steps: int, run: Callable[[int], None]) -> Any:
    """A finished torch.profiler over ``steps`` calls of ``run`` (it records the calling thread)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            run(i)
    return prof


def thread_usage() -> tuple[float, int, float]:
    """Wall clock, minor page faults and kernel CPU seconds of the calling thread (Linux)."""
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return time.perf_counter(), r.ru_minflt, r.ru_stime


def usage_since(start: tuple[float, int, float]) -> tuple[float, int, float]:
    """(ms, minor page faults, kernel s) of the calling thread since ``start``."""
    now = thread_usage()
    return (now[0] - start[0]) * 1e3, now[1] - start[1], now[2] - start[2]


class _Stop(Exception):
    """Raised by the loader inside the official loop once its steps are done."""


class Turn:
    """Hands control between the main thread and an official loop's thread, one step at a time."""

    def __init__(self) -> None:
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None


class TurnLoader:
    """The official loop's ``train_loader``: one batch per turn; times the code between two batches
    (the official step), counts FLOPs of step ``count_step``, profiles the last ``profile_steps``
    steps (torch.profiler, in the loop's own thread) and stops the loop after ``steps``."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], steps: int, turn: Turn, count_step: int,
                 profile_steps: int = 0):
        self.batches, self.steps, self.turn, self.count_step = batches, steps, turn, count_step
        self.profile_steps = profile_steps
        self.usage: list[tuple[float, int, float]] = []  # per step: ms, minor faults, kernel s
        self.flops = 0
        self.profile: Profile = {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        from torch.utils.flop_counter import FlopCounterMode

        prof = torch_profile(activities=[ProfilerActivity.CPU]) if self.profile_steps else None
        for i in range(self.steps):
            self.turn.go.acquire()
            if prof is not None and i == self.steps - self.profile_steps:
                prof.__enter__()
            if i == self.count_step:
                with FlopCounterMode(display=False) as counter:
                    yield self.batches[i % len(self.batches)]
                self.flops = int(counter.get_total_flops())
            else:
                start = thread_usage()
                yield self.batches[i % len(self.batches)]
                self.usage.append(usage_since(start))
            if i < self.steps - 1:
                self.turn.done.release()
        if prof is not None:
            prof.__exit__(None, None, None)
            self.profile = per_step(prof, self.profile_steps)
        raise _Stop  # the last step's turn ends when the loop unwinds (see OfficialLoop.run)


def import_official(path: Path) -> Any:
    """``src.msatrain`` of the official checkout (einops stand-in if missing: see the docstring)."""
    if not (path / "src" / "msatrain.py").is_file():
        raise SystemExit(f"--official {str(path)!r}: no src/msatrain.py; expected a checkout of zrguo/CGGM")
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")

        def rearrange(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("einops is not installed; this stand-in only lets src/eval_metrics.py import")

        stub.rearrange = rearrange  # type: ignore[attr-defined]
        sys.modules["einops"] = stub
        print("note: einops is not installed; an import-only stand-in is used (not called by this step)")
    sys.path.insert(0, str(path))
    from src import msatrain  # the official module

    return msatrain


class OfficialLoop:
    """``train_model`` of the official code for one modulation, in its own thread, step by step."""

    def __init__(self, msatrain: Any, shape: str, modulation: str, batches: list, steps: int, threads: int,
                 count_step: int, profile_steps: int = 0) -> None:
        modalities, outputs, defaults = SHAPES[shape]
        hyp = argparse.Namespace(**COMMON, **defaults, modulation=modulation)
        hyp.orig_dim = [modalities[m][1] for m in ("text", "audio", "vision")]
        hyp.layers, hyp.use_cuda, hyp.output_dim, hyp.num_mod = hyp.nlevels, False, outputs, 3
        hyp.n_train = hyp.n_valid = hyp.n_test = steps
        torch.manual_seed(hyp.seed)
        # msatrain.initiate, without ReduceLROnPlateau's removed `verbose` argument
        model = msatrain.MSAModel(hyp.output_dim, hyp.orig_dim, hyp.proj_dim, hyp.num_heads, hyp.layers,
                                  hyp.relu_dropout, hyp.embed_dropout, hyp.res_dropout, hyp.out_dropout,
                                  hyp.attn_dropout)
        classifier = cls_optimizer = None
        if modulation != "none":
            classifier = msatrain.ClassifierGuided(hyp.output_dim, hyp.num_mod, hyp.proj_dim, hyp.num_heads,
                                                   hyp.cls_layers, hyp.relu_dropout, hyp.embed_dropout,
                                                   hyp.res_dropout, hyp.attn_dropout)
            cls_optimizer = getattr(torch.optim, hyp.optim)(classifier.parameters(), lr=hyp.cls_lr)
        optimizer = getattr(torch.optim, hyp.optim)(model.parameters(), lr=hyp.lr)
        self.settings = {
            "model": model, "optimizer": optimizer, "criterion": getattr(torch.nn, hyp.criterion)(),
            "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=hyp.when,
                                                                    factor=0.1),
            "classifier": classifier, "cls_optimizer": cls_optimizer,
        }
        self.msatrain, self.hyp, self.threads = msatrain, hyp, threads
        self.turn = Turn()
        self.loader = TurnLoader(batches, steps, self.turn, count_step, profile_steps)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        torch.set_num_threads(self.threads)  # intra-op threads are per OS thread
        try:
            self.msatrain.train_model(self.settings, self.hyp, self.loader, [], [])
        except _Stop:
            pass
        except BaseException as exc:  # reported by step()
            self.turn.error = exc
        finally:
            self.turn.done.release()

    def step(self) -> None:
        if not self.thread.is_alive() and not self.thread.ident:
            self.thread.start()
        self.turn.go.release()
        self.turn.done.acquire()
        if self.turn.error is not None:
            raise RuntimeError("the official train_model failed") from self.turn.error


def official_batches(shape: str, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 64 in the official layout: ``text``, ``audio``, ``vision``, ``labels``."""
    modalities, outputs, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {m: torch.randn(64, *s, generator=g) for m, s in modalities.items()}
        if outputs == 1:  # MOSI: float sentiment in [-3, 3], (B, 1, 1) as CMUDataset's labels
            batch["labels"] = torch.empty(64, 1, 1).uniform_(-3, 3, generator=g)
        else:  # IEMOCAP: class indices (the official loader's labels, already long on CPU here)
            batch["labels"] = torch.randint(0, outputs, (64,), generator=g)
        out.append(batch)
    return out


def mmbalance_trainers(shape: str, batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], list]:
    """mmbalance's cggm and joint trainers (``mmbalance.bench.build_pair``) on the same inputs."""
    from mmbalance.bench import PAPER_CASES, build_pair
    from mmbalance.datasets.base import TensorDictDataset
    from mmbalance.presets import TRAIN_PRESETS
    from mmbalance.train import TrainConfig

    case = PAPER_CASES[f"paper_{shape}"]
    tensors = {m: torch.cat([b[m] for b in batches]) for m in case.spec.modalities}
    tensors["target"] = torch.cat([b["labels"].reshape(-1) for b in batches])
    data = TensorDictDataset(tensors)
    preset = dict(TRAIN_PRESETS[case.train_preset])
    cfg = TrainConfig(**{**preset, "batch_size": 64, "scheduler": "none"}, eval_modality_scores=False)
    trainers, device_batches = build_pair(
        "cggm", case.spec, case.model, model_preset=case.model_preset, train_set=data, val_set=data, cfg=cfg,
        device=torch.device("cpu"), epoch=0, method_preset=case.train_preset,
    )
    return trainers, device_batches


def mmbalance_step(trainer: Any, batches: list, i: int) -> Callable[[], None]:
    return lambda: trainer.train_step(batches[i % len(batches)], 0, i % len(batches))


def _timed(step: Callable[[], None]) -> tuple[float, int, float]:
    start = thread_usage()
    step()
    return usage_since(start)


def _counted(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def measure(args: argparse.Namespace, msatrain: Any, shape: str) -> dict[str, Any]:
    """Time the contestants. mmbalance's steps run in a worker thread of their own, as the official
    loops do, so that both sides are served by glibc's per-thread allocator arenas (the main
    thread's arena returns and refaults large blocks differently); the page-fault and kernel-time
    columns show what each side still pays."""
    batches = official_batches(shape, args.batches)
    total = args.warmup + 1 + args.steps  # warm-up, one counted step, timed steps
    extra = args.profile_steps if args.profile and args.only is None else 0  # profiled later
    official = {mod: OfficialLoop(msatrain, shape, mod, batches, total + extra, args.threads, args.warmup,
                                  extra if mod == "none" else 0)
                for mod in ("cggm", "none")} if args.only != "mmbalance" else {}
    trainers, mm_batches = mmbalance_trainers(shape, batches) if args.only != "official" else ({}, [])
    worker = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(args.threads,))
    mine = ["mmbalance cggm", "mmbalance joint"] if trainers else []
    usage: dict[str, list[tuple[float, int, float]]] = {name: [] for name in mine}
    flops: dict[str, int] = {}
    names = [*(f"official {mod}" for mod in official), *mine]
    for i in range(total):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotating order
            if name.startswith("official"):
                official[name.split()[1]].step()
                continue
            step = mmbalance_step(trainers["method" if name.endswith("cggm") else "joint"], mm_batches, i)
            if i == args.warmup:
                flops[name] = worker.submit(_counted, step).result()
                continue
            used = worker.submit(_timed, step).result()
            if i > args.warmup:
                usage[name].append(used)
    for mod, loop in official.items():
        usage[f"official {mod}"] = loop.loader.usage[args.warmup:]
        flops[f"official {mod}"] = loop.loader.flops
        if not extra:
            loop.thread.join(timeout=60)
    for t in trainers.values():
        t.flush_terms()
    ms = {name: [u[0] for u in steps] for name, steps in usage.items()}
    return {"ms": ms, "usage": usage, "flops": flops, "trainers": trainers, "batches": mm_batches,
            "official": official, "worker": worker}


def report(shape: str, result: dict[str, Any]) -> None:
    ms, flops = result["ms"], result["flops"]
    med = {k: statistics.median(v) for k, v in ms.items()}

    def iqr(v: list[float]) -> float:
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [0.0, 0.0, 0.0]
        return q[2] - q[0]

    print(f"\n{shape.upper()} (batch 64, {len(next(iter(ms.values())))} timed steps each)\n")
    print("| contestant | step ms (median ± IQR) | GFLOPs / step | minor page faults / step "
          "| kernel CPU s / step |")
    print("|---|---:|---:|---:|---:|")
    for name in ("official none", "official cggm", "mmbalance joint", "mmbalance cggm"):
        if name in ms:
            faults = statistics.median(u[1] for u in result["usage"][name])
            kernel = statistics.median(u[2] for u in result["usage"][name])
            print(f"| {name} | {med[name]:.1f} ± {iqr(ms[name]):.1f} | {flops[name] / 1e9:.2f} "
                  f"| {faults:,.0f} | {kernel:.2f} |")
    print()
    if "official cggm" in ms:
        print(f"official cggm / official none: {med['official cggm'] / med['official none']:.3f} "
              f"(FLOPs {flops['official cggm'] / flops['official none']:.3f})")
    if "official cggm" in ms and "mmbalance cggm" in ms:
        speed = med["mmbalance cggm"] / med["official cggm"]
        print(f"mmbalance cggm / official cggm: {speed:.3f} (target <= 0.8)")
    if "mmbalance cggm" in ms:
        floor = flops["mmbalance cggm"] / flops["mmbalance joint"]
        ratio = med["mmbalance cggm"] / med["mmbalance joint"]
        print(f"mmbalance cggm / mmbalance joint: {ratio:.3f}; FLOP floor {floor:.3f}; "
              f"{(ratio / floor - 1) * 100:+.1f}% above it (target within 2%)")


def _diff_table(base: Profile, other: Profile, names: tuple[str, str], rows: int) -> None:
    """Per operator: ms (calls) per step on both sides, and its share of the difference in total."""
    total = {n: sum(ms for ms, _ in side.values()) for n, side in zip(names, (base, other), strict=True)}
    gap = total[names[1]] - total[names[0]]
    print(f"self CPU ms per step under the profiler: {names[0]} {total[names[0]]:.1f}, "
          f"{names[1]} {total[names[1]]:.1f}, difference {gap:+.1f}\n")
    print(f"| operator | {names[0]} ms (calls) | {names[1]} ms (calls) | share of the difference |")
    print("|---|---:|---:|---:|")
    diff = {k: other.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0] for k in set(base) | set(other)}
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:rows]:
        (bm, bn), (om, on) = base.get(k, (0.0, 0)), other.get(k, (0.0, 0))
        print(f"| `{k}` | {bm:.1f} ({bn}) | {om:.1f} ({on}) | {diff[k] / gap * 100:+.1f} % |")
    print()


def profile(result: dict[str, Any], steps: int, rows: int) -> None:
    """Where mmbalance's CGGM step spends its time, where its time above mmbalance's joint step goes,
    and (with the official loops in the process) where mmbalance's joint step differs from the
    official ``none`` step: torch.profiler over ``steps`` steps of each."""
    trainers, batches, worker = result["trainers"], result["batches"], result["worker"]
    profs = {}  # profiled in mmbalance's worker thread, where its steps run
    for name in ("method", "joint"):
        def run(i: int, trainer: Any = trainers[name]) -> None:
            mmbalance_step(trainer, batches, i)()

        profs[name] = worker.submit(_profiled, steps, run).result()
    print(profs["method"].key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    ours = {name: per_step(prof, steps) for name, prof in profs.items()}
    for t in trainers.values():
        t.flush_terms()
    _diff_table(ours["joint"], ours["method"], ("mmbalance joint", "mmbalance cggm"), rows)
    official = result.get("official") or {}
    if official:
        for _ in range(steps):  # the last turns of both loops; the none loop profiles its own
            official["none"].step()
            official["cggm"].step()
        for loop in official.values():
            loop.thread.join(timeout=60)
        base = official["none"].loader.profile
        _diff_table(base, ours["joint"], ("official none", "mmbalance joint"), rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of github.com/zrguo/CGGM")
    p.add_argument("--shapes", default="mosi,iemocap", help="comma-separated: mosi, iemocap")
    p.add_argument("--steps", type=int, default=30, help="timed steps per contestant (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batches", type=int, default=4, help="distinct random batches, reused (default 4)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="also profile mmbalance's CGGM step and its difference to the joint step")
    p.add_argument("--only", choices=("official", "mmbalance"),
                   help="time only these two contestants, the other two not built (a control: does sharing "
                   "the process change a side's timings?)")
    p.add_argument("--profile-steps", type=int, default=5)
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error(f"--shapes from {sorted(SHAPES)} (unknown: {unknown}), --steps >= 1, --warmup >= 0 and "
                "--threads >= 1 are required")
    torch.set_num_threads(args.threads)
    msatrain = import_official(args.official.resolve())
    print(f"torch {torch.__version__}; {args.threads} intra-op thread(s); command: "
          f"python results/cost/official_vs_mmbalance.py {' '.join(argv or sys.argv[1:])}")
    for shape in shapes:
        result = measure(args, msatrain, shape)
        report(shape, result)
        if args.profile and result["trainers"]:
            profile(result, args.profile_steps, rows=25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
