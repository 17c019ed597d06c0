"""Cost measurement: exact CPU byte counts, median / IQR, strict alternation, timing blocks, the epoch
the steps run at, and the cost fields."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmbalance.measure as measure
from mmbalance.measure import (
    StepTimes,
    block_ratios,
    compare_cost,
    optimizer_state_bytes,
    peak_memory_bytes,
    persistent_state_bytes,
    summarize_ms,
    time_blocks,
    time_interleaved,
)

CPU = torch.device("cpu")


class Aux(nn.Module):
    """Linear(3, 2) (6 + 2 float32 = 32 bytes), a frozen float32 vector of 4 (16 bytes, never a
    gradient) and a float64 buffer of 5 (40 bytes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.alias = self.lin  # the same module twice: its parameters must be counted once
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.register_buffer("running", torch.zeros(5, dtype=torch.float64))


def _stepped(optimizer_cls, **kwargs) -> tuple[Aux, torch.optim.Optimizer]:
    module = Aux()
    opt = optimizer_cls(module.lin.parameters(), lr=0.1, **kwargs)
    module.lin(torch.ones(4, 3)).sum().backward()
    opt.step()
    return module, opt


def test_persistent_state_bytes_by_hand():
    module, opt = _stepped(torch.optim.Adam)
    # parameters: lin 8 floats + frozen 4 floats = 12 * 4 = 48 bytes (the alias adds nothing)
    # gradients:  lin only, 8 * 4 = 32 bytes (frozen has none)
    # buffer:     5 float64 = 40 bytes
    assert persistent_state_bytes(module) == 48 + 32 + 40 == 120
    # Adam state per stepped parameter: exp_avg + exp_avg_sq (2 * numel floats) + a float32 step:
    # weight 2 * 6 * 4 + 4 = 52, bias 2 * 2 * 4 + 4 = 20
    assert optimizer_state_bytes(opt) == 52 + 20 == 72
    assert persistent_state_bytes(module, [opt]) == 120 + 72 == 192
    module.lin.zero_grad(set_to_none=True)  # freed between steps, allocated again by every backward
    assert persistent_state_bytes(module) == 120
    # resident between steps (the CUDA overhead adds it to the peak delta): no gradients
    assert persistent_state_bytes(module, [opt], gradients=False) == 48 + 40 + 72 == 160


def test_optimizer_state_bytes_sgd_momentum_and_none():
    _, with_momentum = _stepped(torch.optim.SGD, momentum=0.9)
    assert optimizer_state_bytes(with_momentum) == 8 * 4  # one momentum buffer per parameter
    _, plain = _stepped(torch.optim.SGD)
    assert optimizer_state_bytes(plain) == 0  # momentum_buffer is None without momentum


def test_step_times_median_and_iqr():
    st = StepTimes((5.0, 1.0, 4.0, 2.0, 3.0))
    # sorted 1 2 3 4 5: median 3; inclusive quartiles q1 = 2, q3 = 4 -> IQR 2
    assert st.median == 3.0 and st.iqr == 2.0
    # 1 2 3 4: median 2.5; q1 = 1 + 0.75 * (2 - 1) = 1.75, q3 = 3 + 0.25 * (4 - 3) = 3.25 -> IQR 1.5
    assert summarize_ms([4.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "iqr": 1.5, "n": 4}
    assert StepTimes((7.0,)).iqr == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """A train_step that takes ``ms`` milliseconds of the fake clock and logs its calls."""

    def __init__(self, name: str, ms: float, clock: FakeClock, log: list, balancer: nn.Module | None = None):
        self.name, self.ms, self.clock, self.log = name, ms, clock, log
        self.balancer = balancer
        self.flushed = 0
        self.epochs: list[int] = []

    def train_step(self, batch, epoch, step_in_epoch):
        self.log.append((self.name, batch["i"], step_in_epoch))
        self.epochs.append(epoch)
        self.clock.now += self.ms / 1e3

    def flush_terms(self):
        self.flushed += 1


def test_time_interleaved_alternates_and_discards_warmup(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    a, b = FakeTrainer("a", 2.0, clock, log), FakeTrainer("b", 5.0, clock, log)
    batches = [{"i": 0}, {"i": 1}]
    times = time_interleaved({"a": a, "b": b}, batches, steps=3, warmup=2, device=CPU, epoch=4)
    # 5 rounds, a then b each round, batches reused cyclically
    assert log == [(n, i % 2, i % 2) for i in range(5) for n in ("a", "b")]
    assert times["a"].ms == pytest.approx((2.0, 2.0, 2.0)) and times["b"].ms == pytest.approx((5.0, 5.0, 5.0))
    assert a.flushed == b.flushed == 1  # deferred loss checks are read once, after timing
    assert a.epochs == b.epochs == [4] * 5  # every step, warm-up included, runs at the given epoch
    with pytest.raises(ValueError, match="at least one batch"):
        time_interleaved({"a": a}, [], steps=1, warmup=0, device=CPU, epoch=0)


def test_time_blocks_alternates_the_order_and_groups_steps(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    a, b = FakeTrainer("a", 2.0, clock, log), FakeTrainer("b", 5.0, clock, log)
    batches = [{"i": 0}, {"i": 1}, {"i": 2}]
    times = time_blocks({"a": a, "b": b}, batches, blocks=2, steps=3, device=CPU, epoch=6)
    # 6 steps per trainer; a first on even steps of a block, b first on odd ones; batches cycle on
    expected = []
    for block in range(2):
        for k in range(3):
            i = block * 3 + k
            names = ("a", "b") if k % 2 == 0 else ("b", "a")
            expected += [(n, i % 3, i % 3) for n in names]
    assert log == expected
    assert [list(t) for t in times["a"]] == [pytest.approx([2.0] * 3)] * 2
    assert [list(t) for t in times["b"]] == [pytest.approx([5.0] * 3)] * 2
    assert a.epochs == [6] * 6 and a.flushed == b.flushed == 1
    with pytest.raises(ValueError, match="blocks and steps must be integers >= 1"):
        time_blocks({"a": a}, batches, blocks=0, steps=1, device=CPU, epoch=0)


def test_block_ratios_are_ratios_of_the_fastest_steps():
    # block 1: fastest method step 3, fastest joint step 2 -> 1.5 (the 9 ms step, preempted, is ignored)
    # block 2: 4 / 4 -> 1.0
    assert block_ratios([(3.0, 9.0), (4.0, 5.0)], [(2.0, 2.5), (6.0, 4.0)]) == [1.5, 1.0]
    with pytest.raises(ValueError, match="2 blocks and joint 1"):
        block_ratios([(1.0,), (1.0,)], [(1.0,)])
    with pytest.raises(ValueError, match="at least one step time"):
        block_ratios([()], [(1.0,)])


def test_peak_memory_is_none_on_cpu():
    assert peak_memory_bytes(object(), [{}], steps=1, device=CPU, epoch=0) is None


class _Balancer(nn.Module):
    def __init__(self, module: nn.Module | None = None, optimizers=()):
        super().__init__()
        self.extra = module
        self._optimizers = list(optimizers)

    def auxiliary_optimizers(self):
        return self._optimizers


def test_compare_cost_on_cpu_by_hand(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    aux, aux_opt = _stepped(torch.optim.Adam)  # 192 bytes, see test_persistent_state_bytes_by_hand
    model = nn.Linear(10, 1)  # 11 floats = 44 bytes, + 44 for the gradient each backward allocates
    main_opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no state yet
    method = FakeTrainer("method", 3.0, clock, log, _Balancer(aux, [aux_opt]))
    method.model, method.optimizer = model, main_opt
    joint = FakeTrainer("joint", 2.0, clock, log, _Balancer())
    cost = compare_cost(method, joint, [{"i": 0}], steps=4, warmup=1, device=CPU, epoch=7)
    assert log[:2] == [("joint", 0, 0), ("method", 0, 0)]  # joint first, then the method, every round
    assert cost["step_ms_median"] == pytest.approx(3.0) and cost["joint_step_ms_median"] == pytest.approx(2.0)
    assert cost["step_time_ratio"] == pytest.approx(1.5) and cost["timed_steps"] == 4
    assert cost["step_ms_iqr"] == pytest.approx(0.0)
    assert cost["mem_overhead_bytes"] == 192  # joint's balancer adds nothing
    assert cost["peak_mem_bytes"] == 44 + 44 + 192 and cost["memory_kind"] == "cpu_persistent_state"
    assert cost["epoch"] == 7 and method.epochs == joint.epochs == [7] * 5  # timed at the given epoch
