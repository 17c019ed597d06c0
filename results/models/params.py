"""Parameter counts of the full-size paper models (random init, CPU): the table in README.md.

    PYTHONPATH=. python results/models/params.py

Feature dims: MOSI text 768 (BERT) / audio 5 (COVAREP) / vision 20 (Facet); IEMOCAP audio 130
(ComParE) / vision 342 (DenseFace) / text 1024 (BERT-large), the MMIN-style release. A modality's
input projection has ``40 * d + 40`` parameters, so other feature dims change only that row.
"""

from __future__ import annotations

import torch

from mmbalance.datasets.base import DatasetSpec
from mmbalance.models import MODELS

CASES = [
    ("mult", "mosi", DatasetSpec("reg", {"text": (50, 768), "audio": (50, 5), "vision": (50, 20)}, 1)),
    (
        "mult",
        "iemocap",
        DatasetSpec("cls", {"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)}, 4),
    ),
    ("vit_bert", "food101", DatasetSpec("cls", {"image": (3, 224, 224), "text": (50,)}, 101)),
    (
        "deeplab",
        "brats",
        DatasetSpec(
            "seg", {m: (1, 160, 160) for m in ("flair", "t1ce", "t1", "t2")}, 4, target_shape=(160, 160)
        ),
    ),
]


def count(params) -> int:
    return sum(p.numel() for p in params)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, preset, spec in CASES:
        torch.manual_seed(0)
        model = MODELS.build(name, preset)(spec)
        trainable = count(p for p in model.parameters() if p.requires_grad)
        frozen = count(p for p in model.parameters() if not p.requires_grad)
        per_modality = ", ".join(f"{m} {count(model.modality_parameters(m)):,}" for m in model.modalities)
        shared = count(model.shared_parameters())
        rows.append((f"`{name}` / `{preset}`", f"{trainable:,}", f"{frozen:,}", per_modality, f"{shared:,}"))
        del model
    print("| model / preset | trainable | frozen | `modality_parameters(m)` | fusion + head |")
    print("|---|---:|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
