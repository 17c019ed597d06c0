"""Seeded k-means and clustering purity on the device, for the Diagnosing & Re-learning diagnosis.

The official diagnosis (``GeWu-Lab/Diagnosing_Relearning_ECCV2024:code/ours.py``, ``reinit_score``)
scales each feature set to [−1, 1] per dimension (``MinMaxScaler(feature_range=(-1, 1))``), clusters it
with ``sklearn.cluster.KMeans(n_clusters, random_state=0)`` and scores the clusters by their purity.
scikit-learn is not a dependency of mmbalance, and the features live on the training device, so this
module re-implements that pipeline in torch, following scikit-learn's algorithm:

* initialisation: greedy k-means++ (first centre uniform; each next centre the best of
  ``2 + ⌊ln k⌋`` candidates drawn with probability ∝ squared distance to the closest centre);
* Lloyd iterations until the labels stop changing or the total squared centre shift is at most
  ``tol · mean per-dimension variance`` (``tol = 1e-4``), at most ``max_iter = 300``; final labels
  from the final centres; the restart with the lowest inertia wins (``n_init``);
* an empty cluster keeps its previous centre (scikit-learn moves it to a far point instead).

Draws come from a private ``torch.Generator`` on the data's device: nothing touches the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import ConfigError

__all__ = ["minmax_scale", "kmeans", "purity"]


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Per-column affine map of ``x (N, d)`` onto ``[low, high]``, as ``MinMaxScaler``: a constant column
    (zero range) is treated as range 1, so it maps to ``low``."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    span = hi - lo
    span = torch.where(span == 0, torch.ones_like(span), span)
    return (x - lo) / span * (high - low) + low


def _sq_dist(x: Tensor, centres: Tensor) -> Tensor:
    """``(N, k)`` squared Euclidean distances, clamped at 0."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centres.t() + (centres * centres).sum(1)[None, :]
    return d.clamp_min(0)


def _kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    centres = [x[first]]
    closest = _sq_dist(x, x[first][None])[:, 0]
    potential = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, device=x.device, dtype=x.dtype) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), draws).clamp_max(n - 1)
        dist = torch.minimum(closest[None, :], _sq_dist(x, x[candidates]).t())  # (trials, N)
        pots = dist.sum(1)
        best = int(pots.argmin())
        centres.append(x[candidates[best]])
        closest, potential = dist[best], pots[best]
    return torch.stack(centres)


def kmeans(
    x: Tensor, k: int, generator: torch.Generator, n_init: int = 1, max_iter: int = 300, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Cluster ``x (N, d)`` into ``k`` clusters; returns ``(labels (N,) int64, inertia 0-d)``.

    Raises:
        ConfigError: fewer samples than clusters, or ``k`` / ``n_init`` below 1.
    """
    if k < 1 or n_init < 1:
        raise ConfigError(f"k-means needs k >= 1 and n_init >= 1, got k={k}, n_init={n_init}")
    if x.dim() != 2 or x.shape[0] < k:
        raise ConfigError(f"k-means with k={k} needs an (N, d) input with N >= {k}, got {tuple(x.shape)}")
    x = x.double()
    tol_abs = tol * float(x.var(dim=0, unbiased=False).mean())
    best: tuple[Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = _kmeans_plusplus(x, k, generator)
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for _ in range(max_iter):
            new_labels = _sq_dist(x, centres).argmin(1)
            onehot = F.one_hot(new_labels, k).to(x.dtype)
            counts = onehot.sum(0)
            sums = onehot.t() @ x
            moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
            shift = float(((moved - centres) ** 2).sum())
            centres = moved
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
            if shift <= tol_abs:
                break
        dist = _sq_dist(x, centres)
        labels = dist.argmin(1)
        inertia = dist.gather(1, labels[:, None]).sum()
        if best is None or float(inertia) < float(best[1]):
            best = (labels, inertia)
    assert best is not None
    return best


def purity(labels: Tensor, clusters: Tensor) -> float:
    """Share of samples whose label is the majority label of their cluster (``purity_score``)."""
    if labels.shape != clusters.shape or labels.numel() == 0:
        shapes = f"{tuple(labels.shape)}, {tuple(clusters.shape)}"
        raise ConfigError(f"purity needs equally long non-empty labels and clusters, got {shapes}")
    _, label_ids = torch.unique(labels, return_inverse=True)
    _, cluster_ids = torch.unique(clusters, return_inverse=True)
    table = F.one_hot(cluster_ids).double().t() @ F.one_hot(label_ids).double()  # (clusters, labels) counts
    return float(table.max(dim=1).values.sum()) / labels.numel()
