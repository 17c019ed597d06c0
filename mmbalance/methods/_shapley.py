"""Sample-level Shapley valuation of modalities (Wei, Feng, Wang, Hu; CVPR 2024).

The value of a modality subset S for sample i is ``v_i(S) = |S|`` when the model's prediction from S
alone (the other modalities' encoder features zeroed before fusion) is correct, else 0, with
``v_i(∅) = 0``; for two modalities this is the official ``value_all = 2``, ``value_a = value_v = 1``
(``code/sample_level.py``, ``execute_modulation``). Modality m's contribution is its Shapley value::

    φ_i^m = Σ_{S ⊆ M∖{m}} |S|! (M − |S| − 1)! / M! · [v_i(S ∪ {m}) − v_i(S)]

so ``φ^a = (v(a) + v(a, v) − v(v)) / 2`` for two modalities, and ``Σ_m φ_i^m = v_i(M)`` (M when the
full prediction is correct). "Correct" is ``argmax == target`` for classification and the sign
agreement ``(p > 0) == (y > 0)`` for regression (the per-sample form of the regression score of
:mod:`mmbalance.tasks`). Every encoder runs once per sample; only fusion and head run per subset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mmbalance.errors import ConfigError
from mmbalance.methods._stages import eval_mode, iterate
from mmbalance.models.base import MultimodalModel

__all__ = ["shapley_matrix", "subset_values", "correct_predictions", "keep_rows", "valuate"]


def _subset_sizes(num_modalities: int) -> Tensor:
    """``|S|`` of every subset, indexed by its bit mask (bit j set: modality j in S)."""
    return torch.tensor([bin(s).count("1") for s in range(2**num_modalities)], dtype=torch.float64)


def shapley_matrix(num_modalities: int) -> Tensor:
    """``(M, 2^M)`` float64 matrix C with ``φ = C @ V`` for the subset values ``V (2^M, N)`` indexed by
    bit mask. Row m holds ``+w(|S|)`` at ``S ∪ {m}`` and ``−w(|S|)`` at S for every S without m,
    ``w(k) = k! (M − k − 1)! / M!``."""
    if num_modalities < 1:
        raise ConfigError(f"Shapley valuation needs at least one modality, got {num_modalities}")
    m_total = num_modalities
    sizes = _subset_sizes(m_total).long().tolist()
    matrix = torch.zeros(m_total, 2**m_total, dtype=torch.float64)
    for m in range(m_total):
        bit = 1 << m
        for s in range(2**m_total):
            if s & bit:
                continue
            k = sizes[s]
            w = math.factorial(k) * math.factorial(m_total - k - 1) / math.factorial(m_total)
            matrix[m, s | bit] += w
            matrix[m, s] -= w
    return matrix


def subset_values(correct: Tensor) -> Tensor:
    """``V (2^M, N)``: ``v(S) = |S| · correct_S`` from ``correct (2^M − 1, N)`` bool, the correctness
    of every non-empty subset in bit-mask order 1 .. 2^M − 1; row 0 is ``v(∅) = 0``."""
    num_subsets = correct.shape[0] + 1
    m_total = num_subsets.bit_length() - 1
    if 2**m_total != num_subsets:
        raise ConfigError(f"correct must have 2^M - 1 rows, got {correct.shape[0]}")
    sizes = _subset_sizes(m_total).to(correct.device)
    values = torch.cat([torch.zeros_like(correct[:1]), correct]).to(torch.float64)
    return values * sizes[:, None]


def correct_predictions(prediction: Tensor, target: Tensor, task_name: str) -> Tensor:
    """``(B,)`` bool: the class argmax equals the target (cls), or the signs agree (reg; zeros count
    as negative, as the regression score does)."""
    if task_name == "cls":
        return prediction.argmax(dim=1) == target.reshape(-1).long()
    if task_name == "reg":
        return (prediction.reshape(prediction.shape[0]) > 0) == (target.reshape(-1) > 0)
    raise ConfigError(f"sample valuation needs per-sample correctness (cls or reg), got task {task_name!r}")


def keep_rows(feature: Tensor, keep: Tensor) -> Tensor:
    """``feature`` with the rows where ``keep (B,)`` is False zeroed (any trailing shape)."""
    return feature * keep.reshape((-1,) + (1,) * (feature.dim() - 1)).to(feature.dtype)


@torch.no_grad()
def valuate(
    model: MultimodalModel,
    loader: DataLoader,
    task_name: str,
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    modalities: Sequence[str],
) -> Tensor:
    """``(N, M)`` float64 Shapley contributions of every sample the loader yields, in its order, on the
    model's device (no host read). The model runs in eval mode (restored afterwards), as the official
    ``execute_modulation`` does; the caller isolates the RNG.

    Raises:
        ConfigError: the loader yields no batch.
    """
    m_total = len(modalities)
    matrix: Tensor | None = None
    out: list[Tensor] = []
    with eval_mode(model):
        for batch in iterate(loader, to_device, None):
            features, extras = model.encode(batch)
            correct = []
            for s in range(1, 2**m_total):
                kept = {m: features[m] if s >> j & 1 else torch.zeros_like(features[m])
                        for j, m in enumerate(modalities)}
                prediction = model.fuse(kept, extras).prediction
                correct.append(correct_predictions(prediction, batch["target"], task_name))
            values = subset_values(torch.stack(correct))
            if matrix is None:
                matrix = shapley_matrix(m_total).to(values.device)
            out.append((matrix @ values).t())
    if not out:
        raise ConfigError("sample valuation: the training loader yields no batch")
    return torch.cat(out)
