"""``SideStream``: a no-op off CUDA; on CUDA, the wait / join / record_stream discipline (``gpu`` tests)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mmbalance.methods._streams import SideStream

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_scope_off_cuda_is_a_no_op_on_the_current_stream():
    side = SideStream(True)
    x = torch.ones(3)
    with side.scope([x]) as hand_over:
        y = x * 2
        hand_over(y)  # nothing to record on one stream
    assert torch.equal(y, torch.full((3,), 2.0))
    assert side._streams == {}  # no stream was created
    assert not side.active(torch.device("cpu")) and side.active(torch.device("cuda"))
    assert not SideStream(False).active(torch.device("cuda"))


def test_scope_needs_an_input_to_know_its_device():
    with pytest.raises(ValueError, match="at least one input tensor"), SideStream(True).scope([]):
        pass


def test_copies_and_pickles_get_a_fresh_side_stream():
    side = SideStream(True)
    side._streams[torch.device("cpu")] = object()  # stands for a created stream
    for other in (copy.deepcopy(side), pickle.loads(pickle.dumps(side))):
        assert other.enabled is True and other._streams == {}


# -- CUDA -------------------------------------------------------------------------------------------
def _long_work(device: torch.device) -> None:
    """Keep the current stream busy for a while (the host returns at once), so that a missing wait
    shows as a stale read instead of passing by luck."""
    a = torch.randn(2048, 2048, device=device)
    for _ in range(20):
        a = a @ a / 2048**0.5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("enabled", [True, False])
def test_scope_sees_main_work_and_main_sees_the_scope(enabled):
    device = torch.device("cuda")
    side = SideStream(enabled)
    x = torch.zeros(1 << 20, device=device)
    _long_work(device)
    x.add_(1)  # queued on the main stream behind the long work
    main = torch.cuda.current_stream(device)
    with side.scope([x]) as hand_over:
        assert (torch.cuda.current_stream(device) != main) is enabled
        total = x.sum()  # must see the ones: the side stream waited for the main stream
        _long_work(device)  # keeps the side stream busy (when enabled)
        late = total + 0  # queued behind that work
        hand_over(total, late)
    assert torch.cuda.current_stream(device) == main
    assert late.item() == float(1 << 20)  # read on the main stream: it waited for the side stream


@pytest.mark.gpu
@needs_cuda
def test_inputs_are_recorded_on_the_side_stream_and_outputs_on_the_main_stream(monkeypatch):
    device = torch.device("cuda")
    recorded: list[tuple[int, torch.cuda.Stream]] = []
    original = torch.Tensor.record_stream

    def spy(tensor, stream):
        recorded.append((id(tensor), stream))
        original(tensor, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    side = SideStream(True)
    main = torch.cuda.current_stream(device)
    x = torch.ones(8, device=device)
    with side.scope([x]) as hand_over:
        y = x + 1
        hand_over(y)
    assert recorded == [(id(x), side.stream(device)), (id(y), main)]
