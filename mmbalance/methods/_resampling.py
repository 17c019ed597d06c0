"""Re-sampled training rows served alongside the runner's batches (sample valuation's re-sampling).

The official re-sampling rebuilds the training set each epoch as the originals plus D duplicates, each a
(sample, kept modality) pair whose other modalities are zeroed before fusion, and shuffles them
together. mmbalance's runner owns the training loader, so a method cannot change it; instead the D
duplicates, shuffled once per epoch by a private generator, are split into ``⌈D / S⌉``-row chunks for
the epoch's S steps and one chunk joins every training batch. An epoch thus still shows every original
once and every duplicate once, in S larger steps instead of ``(N + D) / B`` steps of B.

The plan (dataset indices, kept modalities), the chunk size and the cursor are plain tensors and
integers, so a checkpoint taken inside an epoch resumes on the same chunk. Chunks cycle: a step past the
last chunk (the cost measurement after training) starts the plan again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.errors import ConfigError

__all__ = ["ResampledRows", "fetch_rows"]


def fetch_rows(dataset: Dataset, indices: Sequence[int], collate_fn: Callable[[Any], Any]) -> Any:
    """The batch of ``dataset`` rows ``indices``, fetched as a DataLoader's fetcher does: one
    ``__getitems__`` call where the dataset has it, else one item per index, then ``collate_fn``."""
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    return collate_fn(items)


class ResampledRows:
    """The epoch's duplicates and the position of the next chunk.

    Attributes:
        index: ``(D,)`` int64 dataset indices of the duplicates, in serving order (CPU).
        keep: ``(D,)`` int64 index of the modality each duplicate keeps (CPU).
        chunk: rows per step, ``⌈D / S⌉`` (0 when there is nothing to serve).
        cursor: chunks served so far this epoch.
    """

    def __init__(self) -> None:
        self.index = torch.zeros(0, dtype=torch.long)
        self.keep = torch.zeros(0, dtype=torch.long)
        self.chunk = 0
        self.cursor = 0

    def __len__(self) -> int:
        return int(self.index.numel())

    def reset(self, index: Tensor, keep: Tensor, steps: int, generator: torch.Generator | None = None
              ) -> None:
        """A new plan for an epoch of ``steps`` steps, shuffled by ``generator`` (kept in order without)."""
        if index.shape != keep.shape or index.dim() != 1:
            shapes = f"{tuple(index.shape)}, {tuple(keep.shape)}"
            raise ConfigError(f"index and keep must be equally long 1-d tensors, got {shapes}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        n = index.numel()
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        self.index, self.keep = index.long()[order], keep.long()[order]
        self.chunk = math.ceil(len(self) / steps) if len(self) else 0
        self.cursor = 0

    def clear(self) -> None:
        """No plan: the next steps get no extra rows."""
        self.reset(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1)

    def next_chunk(self) -> tuple[list[int], Tensor] | None:
        """``(dataset indices, kept modality per row)`` of the next chunk, or None without a plan."""
        if not self.chunk:
            return None
        chunks = math.ceil(len(self) / self.chunk)
        start = (self.cursor % chunks) * self.chunk
        self.cursor += 1
        rows = slice(start, start + self.chunk)
        return self.index[rows].tolist(), self.keep[rows]  # CPU tensors: no device read

    def state(self) -> dict[str, Any]:
        return {"index": self.index.clone(), "keep": self.keep.clone(), "chunk": self.chunk,
                "cursor": self.cursor}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.index = state["index"].clone().long()
        self.keep = state["keep"].clone().long()
        self.chunk, self.cursor = int(state["chunk"]), int(state["cursor"])
