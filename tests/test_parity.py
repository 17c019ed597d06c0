"""``joint`` through mmbalance equals a plain PyTorch loop, weight for weight."""

from __future__ import annotations

import torch

from mmbalance.parity import parity_setup


def test_joint_matches_bare_loop_weights_exactly():
    trainer, bare, batches = parity_setup("synthetic_cls3", batch_size=32, n_batches=6)
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
        bare.train_step(b)
    trainer.flush_terms()
    ours = dict(trainer.model.named_parameters())
    theirs = dict(bare.model.named_parameters())
    assert ours.keys() == theirs.keys()
    moved = 0
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name
        moved += 1
    assert moved > 0


def test_parity_detects_a_difference():
    # The comparison above is not vacuous: one extra step on one side breaks equality.
    trainer, bare, batches = parity_setup("synthetic_cls3", batch_size=32, n_batches=2)
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
        bare.train_step(b)
    bare.train_step(batches[0])
    pairs = zip(trainer.model.parameters(), bare.model.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)
