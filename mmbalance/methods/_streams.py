"""A second CUDA stream for work that depends on a few inputs only (CGGM's heads on detached features).

Work queued inside :meth:`SideStream.scope` runs on a side stream of the inputs' CUDA device, so it
can overlap the main stream's own work. Autograd runs each backward op on the stream of its forward
op, so the backward of a graph built inside the scope also runs on the side stream, beside the main
backward, and ``backward()`` returns with the main stream synchronised with it.

The stream discipline:

* entering: the side stream waits for everything queued on the main stream so far (the inputs are
  ready), and each input is ``record_stream``-ed on the side stream, so the caching allocator does
  not hand its memory to a main-stream tensor while the side stream may still read it;
* ``hand_over(*tensors)``: each tensor made inside the scope and read afterwards on the main stream
  is ``record_stream``-ed on the main stream, for the same reason in the other direction;
* leaving: the main stream waits for the side stream, so everything queued after the scope sees its
  results.

Off CUDA, or when disabled, the scope is a no-op and ``hand_over`` does nothing: the same code runs
in the same order on one stream. Results do not depend on the switch (the kernels and their launch
order are the same; only the stream they are queued on differs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["SideStream"]


def _ignore(*tensors: Tensor) -> None:
    """``hand_over`` of a scope on one stream: nothing to record."""


class SideStream:
    """Queue a block of work on a second stream of the inputs' CUDA device (see module docstring).

    Args:
        enabled: use the side stream on CUDA; ``False`` runs every scope on the current stream.

    The stream is created on first use, one per device; copies and pickles of the owner get a fresh
    ``SideStream`` (streams are not state).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def active(self, device: torch.device) -> bool:
        """Whether a scope on ``device`` runs on the side stream."""
        return self.enabled and device.type == "cuda"

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream of ``device`` (created on first use)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    @contextmanager
    def scope(self, inputs: Iterable[Tensor]) -> Iterator[Callable[..., None]]:
        """Run the block on the side stream of the inputs' device; yields ``hand_over(*tensors)``.

        ``inputs``: every tensor made before the scope that the block reads (at least one; their
        device decides). On exit, also when the block raises, the main stream waits for the side
        stream.
        """
        inputs = list(inputs)
        if not inputs:
            raise ValueError("SideStream.scope needs at least one input tensor (its device picks the stream)")
        device = inputs[0].device
        if not self.active(device):
            yield _ignore
            return
        main = torch.cuda.current_stream(device)
        side = self.stream(device)
        side.wait_stream(main)
        for tensor in inputs:
            tensor.record_stream(side)

        def hand_over(*tensors: Tensor) -> None:
            for tensor in tensors:
                tensor.record_stream(main)

        try:
            with torch.cuda.stream(side):
                yield hand_over
        finally:
            main.wait_stream(side)

    def __deepcopy__(self, memo: dict[int, Any]) -> SideStream:
        return SideStream(self.enabled)

    def __getstate__(self) -> dict[str, Any]:
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.enabled = state["enabled"]
        self._streams = {}
