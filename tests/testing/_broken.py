"""Methods with one deliberate contract bug each (and one correct method), for the kit's own tests."""

from __future__ import annotations

import itertools

import torch

from mmbalance.balancer import Balancer


def _grads(part):
    return [p.grad for p in part.parameters() if p.grad is not None]


class HalveEncoders(Balancer):
    """Correct: halves the encoder gradients, declared in its scope."""

    grad_edit_scope = frozenset({"encoders"})

    def on_after_backward(self, ctx):
        torch._foreach_mul_(_grads(ctx.model.encoders), 0.5)


class FiveModalities(HalveEncoders):
    """Declares five or more modalities: no synthetic task has that many."""

    min_modalities = 5


class NanLoss(Balancer):
    """Its loss term is NaN."""

    def loss_terms(self, output, batch, task):
        return {k: v * float("nan") for k, v in super().loss_terms(output, batch, task).items()}


class HeadOutsideScope(Balancer):
    """Declares the encoders, edits the head's gradients."""

    grad_edit_scope = frozenset({"encoders"})

    def on_after_backward(self, ctx):
        torch._foreach_mul_(_grads(ctx.model.head), 0.5)


_seeds = itertools.count()


class UnseededNoise(Balancer):
    """Adds gradient noise from a private generator seeded differently in every instance."""

    grad_edit_scope = frozenset({"head"})

    def __init__(self, config=None):
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(next(_seeds))

    def on_after_backward(self, ctx):
        for grad in _grads(ctx.model.head):
            grad.add_(torch.randn(grad.shape, generator=self.generator), alpha=1e-2)


class HiddenCounter(Balancer):
    """Scales the head's gradients by 1 / (steps so far), a counter its training state misses."""

    grad_edit_scope = frozenset({"head"})

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0

    def on_after_backward(self, ctx):
        self.steps += 1
        torch._foreach_mul_(_grads(ctx.model.head), 1.0 / self.steps)


class Count:
    """A plain object that ``torch.load(weights_only=True)`` refuses."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return type(other) is Count and other.n == self.n


class PickledHostState(HiddenCounter):
    """Keeps its counter in ``host_state``, but as a pickled object."""

    def host_state(self):
        return {"steps": Count(self.steps)}

    def load_host_state(self, state):
        self.steps = state["steps"].n


class ValidationMemory(Balancer):
    """Halves the head's gradients once a validation has ended, a flag its training state misses
    (so only a resume across an epoch boundary shows it)."""

    grad_edit_scope = frozenset({"head"})

    def __init__(self, config=None):
        super().__init__(config)
        self.validated = False

    def on_validation_end(self, epoch, metrics):
        self.validated = True

    def on_after_backward(self, ctx):
        if self.validated:
            torch._foreach_mul_(_grads(ctx.model.head), 0.5)
