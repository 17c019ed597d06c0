"""``ValidationHeadsBalancer``: unimodal heads scored on the validation split after every epoch.

MSES (early stopping per modality) and MSLR (learning rates from validation scores) follow the
AGM_ICCV2023 re-implementation: after each epoch, every modality's unimodal branch is evaluated on
the validation split, and the method updates per-modality state from those numbers. This base
holds what the two share:

* the unimodal heads (:class:`~mmbalance.methods._headed.HeadedBalancer`, on detached features, so
  their ``unimodal/<m>`` loss trains only the heads) that give each modality's prediction;
* the epoch hook: at the start of epoch ``e >= 1`` (heads built), one validation pass of the heads,
  under a forked RNG (the main run's random stream is untouched), handed to
  :meth:`ValidationHeadsBalancer.on_unimodal_validation` as the results of epoch ``e - 1``;
* a host cache of per-modality buffers read by the step hooks (:meth:`host_values`): one device read
  after each change (epoch start, state-dict load), never one per step.

Validation data only, never test.
"""

from __future__ import annotations

from typing import Any

from mmbalance.balancer import EpochContext
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._stages import isolated_rng, unimodal_validation

__all__ = ["ValidationHeadsBalancer"]


class ValidationHeadsBalancer(HeadedBalancer):
    """A HeadedBalancer that scores its heads on validation after every epoch (see the module)."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._host: dict[str, list[Any]] = {}
        # A loaded state (checkpoint, best-epoch restore) changes the buffers: drop their host copies.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._host.clear())

    def host_values(self, buffer: str) -> list[Any]:
        """``self.<buffer>.tolist()``, read from the device once after each change, then cached."""
        if buffer not in self._host:
            self._host[buffer] = getattr(self, buffer).tolist()
        return self._host[buffer]

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """From epoch 1 on (once the heads are built): validate the heads on ``ctx.val_loader`` and
        pass ``{m: (mean loss, mean score)}`` of the finished epoch to :meth:`on_unimodal_validation`."""
        self._host.clear()
        if self.heads is None or ctx.epoch < 1 or not self.heads.built:
            return
        with isolated_rng(ctx.device):
            stats = unimodal_validation(
                ctx.model, self.heads, ctx.val_loader, ctx.task, ctx.to_device, self.modalities
            )
        self.on_unimodal_validation(ctx, ctx.epoch - 1, stats)
        self._host.clear()

    def on_unimodal_validation(
        self, ctx: EpochContext, epoch: int, stats: dict[str, tuple[float, float]]
    ) -> None:
        """Update the method's state from the validation of epoch ``epoch`` (0-based). Every subclass
        defines it (MSES, MSLR): it is what the base's validation is for."""
        raise NotImplementedError(f"{type(self).__name__} must define on_unimodal_validation")
