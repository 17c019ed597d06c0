"""Benchmark cases: the synthetic tasks, and paper-shaped random inputs for the paper models.

A :class:`BenchCase` names a model and the input shapes of a paper dataset, so that ``mmbalance
bench --paper-models`` can cost the paper architectures without any data: MOSI / IEMOCAP MulT-style,
Food-101 ViT-B/16 + BERT-base, BraTS DeepLabv3+ ResNet-101, on :func:`random_batches`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmbalance.datasets.base import DatasetSpec, TensorDictDataset

__all__ = ["SYNTHETIC_TASKS", "BenchCase", "PAPER_CASES", "random_batches"]

SYNTHETIC_TASKS = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")


@dataclass(frozen=True)
class BenchCase:
    """A model + input shapes to benchmark on: a registered dataset, or a paper-shaped random one."""

    name: str
    spec: DatasetSpec
    model: str
    model_preset: str | None
    batch_size: int  # the paper's batch size (used on CUDA); CPU runs use --batch-size
    train_preset: str | None = None


def _paper_cases() -> dict[str, BenchCase]:
    mosi = DatasetSpec(
        task="reg",
        modalities={"text": (50, 768), "audio": (50, 5), "vision": (50, 20)},
        num_outputs=1,
        default_model="mult",
        default_preset="mosi",
    )
    iemocap = DatasetSpec(
        task="cls",
        modalities={"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)},
        num_outputs=4,
        default_model="mult",
        default_preset="iemocap",
    )
    food = DatasetSpec(
        task="cls",
        modalities={"image": (3, 224, 224), "text": (50,)},
        num_outputs=101,
        default_model="vit_bert",
        default_preset="food101",
    )
    brats = DatasetSpec(
        task="seg",
        modalities={"flair": (1, 160, 160), "t1ce": (1, 160, 160), "t1": (1, 160, 160), "t2": (1, 160, 160)},
        num_outputs=4,
        target_shape=(160, 160),
        default_model="deeplab",
        default_preset="brats",
    )
    return {
        "paper_mosi": BenchCase("paper_mosi", mosi, "mult", "mosi", 64, "mosi"),
        "paper_iemocap": BenchCase("paper_iemocap", iemocap, "mult", "iemocap", 64, "iemocap"),
        "paper_food101": BenchCase("paper_food101", food, "vit_bert", "food101", 128, "food101"),
        "paper_brats": BenchCase("paper_brats", brats, "deeplab", "brats", 64, "brats"),
    }


PAPER_CASES = _paper_cases()


def random_batches(spec: DatasetSpec, batch_size: int, n: int, seed: int = 0) -> TensorDictDataset:
    """``n * batch_size`` random samples of ``spec``'s shapes (token ids for 1-D int inputs)."""
    g = torch.Generator().manual_seed(seed)
    size = n * batch_size
    tensors: dict[str, torch.Tensor] = {}
    for m, shape in spec.modalities.items():
        if len(shape) == 1:  # token ids (Food-101 text): ids in [1, 30000), no padding
            tensors[m] = torch.randint(1, 30000, (size, *shape), generator=g)
        else:
            tensors[m] = torch.randn(size, *shape, generator=g)
    if spec.task == "cls":
        tensors["target"] = torch.randint(0, spec.num_outputs, (size,), generator=g)
    elif spec.task == "reg":
        tensors["target"] = torch.empty(size).uniform_(-3, 3, generator=g)
    else:
        tensors["target"] = torch.randint(0, spec.num_outputs, (size, *spec.target_shape), generator=g)
    return TensorDictDataset(tensors)
