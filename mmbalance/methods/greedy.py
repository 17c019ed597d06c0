"""``greedy``: balanced multimodal learning against the greedy nature of multimodal DNNs
(Wu, Jastrzębski, Cho, Geras; ICML 2022).

The two modalities exchange information through a cross-modal MMTM block (squeeze both features,
excite each with sigmoid gates). The *conditional learning speed* of each modality is the running
sum of ``‖∇θ‖² / ‖θ‖²`` of its bypass (MMTM) parameters over that of its own encoder;
``d_BDR = log10(M_byp,0 / M_main,0) − log10(M_byp,1 / M_main,1)``. When ``|d_BDR| > ε`` the
algorithm enters a *curation* window of ``window`` steps in which the cared-for modality's MMTM gate
is replaced by its running average, so that modality cannot lean on the other and must learn alone.

Port of ``nyukat/greedy_multimodal_learning`` (``src/callbacks.py`` ``Bias_Mitigation_Strong`` and
``Bias_Mitigation_Random``, ``src/balanced_mmtm.py`` ``MMTM_mitigate``, ``configs/training_guided.gin``).
Deviations (``methods/greedy.md``): our models have no MMTMs between their encoders' layers (the
official ``MMTM_MVCNN`` applies three between its two branches), so the balancer owns one MMTM
block (``mmbalance.models.mmtm``) between the encoder outputs and the fusion, trained by its own
optimizer and used at test time too; the running average of the second modality's gate is fixed
(official uses the first modality's gate); the state machine runs on the device, with the speeds
and d_BDR in float64 (the official Python doubles); the main path is the encoder (the official
branch also holds its own classifier, which our shared-head models do not have).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.methods._grads import present_grads, step_auxiliary
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.mmtm import MMTM

__all__ = ["Greedy", "GreedyConfig", "conditional_learning_speed", "bdr_difference", "curation_update"]

_TINY = 1e-30


@dataclass(frozen=True)
class GreedyConfig(MethodConfig):
    epsilon: float = 0.01  # ε: curation threshold on |d_BDR| (training_guided.gin)
    window: int = 5  # curation_windowsize: steps of a curation window (training_guided.gin)
    # first epoch (0-based) with re-balancing; official starting_epoch=2 with 1-based epochs
    start_epoch: int = 1
    variant: Literal["guided", "random"] = "guided"  # Bias_Mitigation_Strong or Bias_Mitigation_Random
    ratio: int = 4  # MMTM squeeze ratio: hidden = int(2 (d_0 + d_1) / ratio) (model.py: MMTM(c, c, 4))
    mmtm_lr: float | None = None  # LR of the MMTM block's own optimizer (None = the run's LR)

    def check(self) -> None:
        need(self, self.epsilon >= 0, "epsilon", ">= 0")
        need(self, self.window >= 1, "window", "an integer >= 1")
        need(self, self.start_epoch >= 0, "start_epoch", "an integer >= 0")
        need(self, self.ratio >= 1, "ratio", "an integer >= 1")
        need(
            self,
            self.mmtm_lr is None or (finite(self.mmtm_lr) and self.mmtm_lr > 0),
            "mmtm_lr",
            "None or > 0",
        )


# -- the arithmetic (hand-checked in tests/methods/test_greedy.py) ----------------------------------
def conditional_learning_speed(grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """``Σ‖g‖² / Σ‖θ‖²`` over a parameter group (one step's term of ``M_main`` / ``M_bypass``), a
    float64 0-d tensor: the norms are taken in float64 (``compute_BDR`` adds each tensor's
    ``(p ** 2).sum().item()`` as Python doubles)."""
    wide = torch.float64
    gn = torch.stack(torch._foreach_norm(grads, 2, dtype=wide)).pow(2).sum() if grads else None
    wn = torch.stack(torch._foreach_norm(params, 2, dtype=wide)).pow(2).sum()
    return (wn.new_zeros(()) if gn is None else gn) / wn.clamp_min(_TINY)


def bdr_difference(m_bypass: Tensor, m_main: Tensor) -> Tensor:
    """``d_BDR = log10(M_byp,0 / M_main,0) − log10(M_byp,1 / M_main,1)`` (``compute_BDR``)."""
    bdr = torch.log10(m_bypass.clamp_min(_TINY) / m_main.clamp_min(_TINY))
    return bdr[0] - bdr[1]


def curation_update(
    d_bdr: Tensor, curation: Tensor, caring: Tensor, step: Tensor, epsilon: float, window: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ``Bias_Mitigation_Strong.on_backward_end`` (unlocked), on device tensors.

    Outside curation (``d_bdr`` was just computed): enter curation when ``|d_BDR| > ε``, caring for
    modality 0 if ``d_BDR > 0`` and modality 1 if ``d_BDR < 0``, with the step counter at 0;
    otherwise stay out with caring 0. Inside curation: count the step; leave after ``window`` steps.
    Returns ``(curation, caring, step)``.
    """
    enter = (~curation) & (d_bdr.abs() > epsilon)
    new_caring = torch.where(d_bdr < 0, torch.ones_like(caring), torch.zeros_like(caring))
    counted = step + 1
    leave = curation & (counted == window)
    next_curation = torch.where(curation, ~leave, enter)
    next_caring = torch.where(curation, caring, torch.where(enter, new_caring, torch.zeros_like(caring)))
    next_step = torch.where(curation, counted, torch.zeros_like(step))
    return next_curation, next_caring, next_step


@register_method("greedy")
class Greedy(Balancer):
    """Greedy-learning mitigation: conditional learning speeds decide curation windows of an MMTM."""

    Config = GreedyConfig
    presets = {
        "modelnet40": {"epsilon": 0.01, "window": 5, "start_epoch": 1},  # configs/training_guided.gin
    }
    max_modalities = 2
    paper = "Wu et al., ICML 2022 (nyukat/greedy_multimodal_learning)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._optimizer_factory = optimizer_factory
        self.mmtm = MMTM(self.config.ratio, seed=int(torch.initial_seed()) + 104729)
        self.mmtm_optimizer: torch.optim.Optimizer | None = None
        self._main = [model.modality_parameters(m) for m in self.modalities]
        # curation state machine (device tensors; moved by balancer.to(device)); the speeds and
        # d_BDR in float64, as the official Python doubles
        self.register_buffer("m_bypass", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("m_main", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("d_bdr", torch.zeros((), dtype=torch.float64))
        self.register_buffer("curation", torch.zeros((), dtype=torch.bool))
        self.register_buffer("caring", torch.zeros((), dtype=torch.long))
        self.register_buffer("curation_step", torch.zeros((), dtype=torch.long))
        self._epoch = 0
        # a state dict builds the MMTM from its saved layout; its optimizer must exist before a
        # training state's optimizer state is loaded into it
        self.register_load_state_dict_post_hook(lambda module, _keys: module._make_optimizer())

    def _make_optimizer(self) -> None:
        """The MMTM's own optimizer, once the block is built (first forward or a loaded state)."""
        if self.mmtm_optimizer is None and self.mmtm.built:
            params = list(self.mmtm.parameters())
            self.mmtm_optimizer = self._optimizer_factory(params, lr=self.config.mmtm_lr)

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch = ctx.epoch

    def host_state(self) -> dict[str, int]:
        return {"epoch": self._epoch}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state["epoch"])

    @property
    def unlocked(self) -> bool:
        return self._epoch >= self.config.start_epoch

    # -- forward ----------------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        features, extras = model.encode(batch)
        a, b = self.modalities
        gated = self.mmtm((features[a], features[b]), self.curation, self.caring)
        self._make_optimizer()
        out = model.fuse({a: gated[0], b: gated[1]}, extras)
        out.features = features
        return out

    def predict(self, output: ModelOutput) -> Tensor:
        """Test-time rule: the model's fusion on MMTM-gated features (no curation at test time)."""
        if not self.mmtm.built:
            raise ConfigError(
                "greedy: the MMTM block is built on the first training step; predict ran before it"
            )
        a, b = self.modalities
        gated = self.mmtm((output.features[a], output.features[b]))
        return self.model.fuse({a: gated[0], b: gated[1]}, output.extras).prediction

    def inference_state_dict(self) -> dict[str, Tensor]:
        return {f"mmtm.{k}": v for k, v in self.mmtm.state_dict().items()}

    # -- measurement and the curation state machine ----------------------------------------------
    def _bypass_groups(self) -> list[list[nn.Parameter]]:
        core = self.mmtm.core
        assert core is not None
        shared = list(core.fc_squeeze.parameters())
        return [list(core.fc_excite[i].parameters()) + shared for i in range(2)]

    @torch.no_grad()
    def on_after_backward(self, ctx: StepContext) -> None:
        """Read (never edit) gradients: update M_main / M_bypass and the curation state for the next
        step (``Bias_Mitigation_Strong.on_backward_end``), or draw the random variant's mode."""
        cfg: GreedyConfig = self.config
        if cfg.variant == "random":
            if self.unlocked:
                mode = torch.randint(3, (), device=self.curation.device)
                self.curation.copy_(mode > 0)
                self.caring.copy_(torch.where(mode == 1, 1, 0))
            else:
                self.curation.fill_(False)
                self.caring.fill_(0)
            self.epoch_means.update(curation_fraction=self.curation, caring=self.caring)
            return
        compute = ~self.curation if self.unlocked else torch.ones_like(self.curation)
        speeds_main, speeds_byp = [], []
        for main, byp in zip(self._main, self._bypass_groups(), strict=True):
            speeds_main.append(conditional_learning_speed(present_grads(main), main))
            speeds_byp.append(conditional_learning_speed(present_grads(byp), byp))
        gate = compute.to(self.m_main.dtype)
        self.m_main += gate * torch.stack(speeds_main)
        self.m_bypass += gate * torch.stack(speeds_byp)
        self.d_bdr.copy_(torch.where(compute, bdr_difference(self.m_bypass, self.m_main), self.d_bdr))
        if self.unlocked:
            curation, caring, step = curation_update(
                self.d_bdr, self.curation, self.caring, self.curation_step, cfg.epsilon, cfg.window
            )
            self.curation.copy_(curation)
            self.caring.copy_(caring)
            self.curation_step.copy_(step)
        else:
            self.curation.fill_(False)
            self.caring.fill_(0)
        self.epoch_means.update(d_bdr=self.d_bdr, curation_fraction=self.curation, caring=self.caring)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if self.mmtm_optimizer is not None:
            step_auxiliary(ctx.scaler, self.mmtm_optimizer)

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of d_BDR (guided), the fraction of steps in curation (``curation_fraction``)
        and the cared-for index (``caring``); the accumulated speeds ``m_main/<m>``, ``m_bypass/<m>``."""
        out = self.epoch_means.pop()
        if not out:
            return {}
        speeds = torch.stack([self.m_main, self.m_bypass]).tolist()
        for i, m in enumerate(self.modalities):
            out[f"m_main/{m}"], out[f"m_bypass/{m}"] = speeds[0][i], speeds[1][i]
        return out
