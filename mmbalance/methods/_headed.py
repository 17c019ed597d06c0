"""``HeadedBalancer``: the shared base of methods that train one unimodal head per modality.

OGM-GE, MMPareto, MSES, MSLR, QMF, G-Blending, UME and others need a prediction from each modality
alone. The base builds :class:`~mmbalance.methods._heads.UnimodalHeads` in ``setup`` from the
Config's head fields (``head_hidden``, ``head_lr``, ``sequence_pool``, whichever it declares; see
:class:`~mmbalance.methods._config.HeadConfig`), adds their loss terms ``unimodal/<m>`` to the task
loss, and steps their own optimizer after the main one, through the run's GradScaler. A method
changes only what differs: ``heads_detach`` (whether the head loss reaches the encoders), and its
own ``loss_terms`` / gradient edits built from :meth:`unimodal_predictions`. A configuration that
needs no heads (MSLR's fixed rates) returns ``False`` from :meth:`HeadedBalancer.uses_heads`: then
``self.heads`` is ``None`` and the base adds no term and steps nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from mmbalance.balancer import Balancer, OptimizerFactory, StepContext
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["HeadedBalancer"]


class HeadedBalancer(Balancer):
    """A Balancer with unimodal heads (``self.heads``) and their optimizer.

    Class attributes:
        heads_detach: the heads read detached features, so their loss trains the heads only
            (``True``), or it also reaches the encoders (``False``).
    """

    heads_detach: ClassVar[bool] = True

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self.heads = self.make_heads(task, optimizer_factory) if self.uses_heads() else None

    def uses_heads(self) -> bool:
        """Whether this configuration trains heads (default ``True``); read once, in ``setup``."""
        return True

    def make_heads(
        self, task: Any, optimizer_factory: OptimizerFactory | None, **options: Any
    ) -> UnimodalHeads:
        """Unimodal heads from the Config's head fields; ``options`` override them."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "hidden": getattr(cfg, "head_hidden", None),
            "sequence_pool": getattr(cfg, "sequence_pool", "mean"),
            "detach": self.heads_detach,
            "optimizer_factory": optimizer_factory,
            "lr": getattr(cfg, "head_lr", None),
        }
        kwargs.update(options)
        return UnimodalHeads.for_task(self.modalities, task, **kwargs)

    def unimodal_predictions(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: head_m(features[m])}``, shaped like the fused prediction (built on the first call)."""
        return self.heads(output.features, target_size(batch))

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task`` on the fused prediction, then ``unimodal/<m>`` for every head."""
        terms = super().loss_terms(output, batch, task)
        if self.heads is not None:
            predictions = self.unimodal_predictions(output, batch)
            terms.update(self.heads.loss_terms(predictions, batch["target"], task))
        return terms

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the heads' own optimizer (after the main step, before ``scaler.update``)."""
        if self.heads is not None:
            self.heads.step(ctx.scaler)
