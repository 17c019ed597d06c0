"""Training presets: the official training setup per dataset (``TrainConfig`` fields).

The paper datasets' values are the official CGGM run scripts' argparse defaults
(``zrguo/CGGM:run/{food,mosi,iemo,brats}_run.py``; reference ``cggm.md`` §3). Method-side settings
(ρ, λ, cls_lr, ...) live in each method's own ``presets`` under the same keys, and model sizes in the
model builders' presets. A preset name applies to the training setup always, and to a method or a
model when it defines that preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["TRAIN_PRESETS"]

_MSA = {  # src/msatrain.py via run/mosi_run.py and run/iemo_run.py
    "epochs": 30,
    "batch_size": 64,
    "optimizer": "adam",  # the paper text says AdamW for IEMOCAP; the code uses Adam
    "lr": 1e-3,
    "weight_decay": 0.0,
    "scheduler": "plateau",  # ReduceLROnPlateau(min, patience=`when`=10, factor 0.1) on val loss
    "plateau_patience": 10,
    "plateau_factor": 0.1,
    "clip_grad_norm": 0.8,
    "seed": 666,
}

TRAIN_PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Embedded synthetic data: small, fast, CPU; the default benchmark and the CI data.
    "synthetic": {
        "epochs": 8,
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 1e-3,
        "scheduler": "none",
        # The paper's protocol: the official code clips the global gradient norm at 0.8 for every
        # method on MOSI, IEMOCAP and Food-101, and official CGGM is only defined with that clip
        # (it bounds the exploding coefficients when Σ Δε ≈ 0).
        "clip_grad_norm": 0.8,
        "cost_steps": 20,
        "cost_warmup": 3,
    },
    "mosi": dict(_MSA),
    "mosei": dict(_MSA),
    "iemocap": dict(_MSA),
    "food101": {  # src/foodtrain.py via run/food_run.py
        "epochs": 60,
        "batch_size": 128,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 6e-3,
        "scheduler": "plateau",
        "plateau_patience": 10,
        "plateau_factor": 0.1,
        "clip_grad_norm": 0.8,
        "seed": 666,
    },
    "brats": {  # src/segtrain.py via run/brats_run.py: per-iteration warm-up + cosine, no clipping
        "epochs": 75,
        "batch_size": 64,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "lr": 1e-2,
        "scheduler": "cosine",
        "warmup_epochs": 10,
        "warmup_start_lr": 4e-4,
        "final_lr": 1e-3,
        "clip_grad_norm": None,
        "seed": 666,
    },
}
