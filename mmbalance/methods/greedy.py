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
Deviations (``methods/greedy.md``): our models have no MMTM inside their encoders, so the balancer
owns one MMTM block between the encoders and the fusion (trained by its own optimizer, used at test
time too); the running average of the second modality's gate is fixed (official uses the first
modality's gate); the state machine runs on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, OptimizerFactory, StepContext
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._heads import build_with_generator, feature_kind
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["Greedy", "GreedyConfig", "MMTM", "conditional_learning_speed", "bdr_difference", "curation_update"]

VARIANTS = ("guided", "random")
_KINDS = ("vector", "sequence", "map")
_TINY = 1e-30


@dataclass(frozen=True)
class GreedyConfig:
    epsilon: float = 0.01  # ε: curation threshold on |d_BDR| (training_guided.gin)
    window: int = 5  # curation_windowsize: steps of a curation window (training_guided.gin)
    start_epoch: int = 1  # first epoch (0-based) with re-balancing; official starting_epoch=2 with 1-based epochs
    variant: str = "guided"  # "guided" (Bias_Mitigation_Strong) or "random" (Bias_Mitigation_Random)
    ratio: int = 4  # MMTM squeeze ratio: hidden = int(2 (d_0 + d_1) / ratio) (model.py: MMTM(c, c, 4))
    mmtm_lr: float | None = None  # LR of the MMTM block's own optimizer (None = the run's LR)

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {self.start_epoch!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.ratio, int) or self.ratio < 1:
            raise ValueError(f"ratio must be an integer >= 1, got {self.ratio!r}")
        if self.mmtm_lr is not None and not self.mmtm_lr > 0:
            raise ValueError(f"mmtm_lr must be None or > 0, got {self.mmtm_lr!r}")


# -- the arithmetic (hand-checked in tests/methods/test_greedy.py) ----------------------------------
def conditional_learning_speed(grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """``Σ‖g‖² / Σ‖θ‖²`` over a parameter group (one step's term of ``M_main`` / ``M_bypass``)."""
    gn = torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else params[0].new_zeros(())
    wn = torch.stack(torch._foreach_norm(params)).pow(2).sum()
    return gn / wn.clamp_min(_TINY)


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


class _MMTMCore(nn.Module):
    """``fc_squeeze`` over the concatenated squeezed features, one excitation layer per modality."""

    def __init__(self, dims: tuple[int, int], ratio: int) -> None:
        super().__init__()
        hidden = int(2 * (dims[0] + dims[1]) / ratio)
        if hidden < 1:
            raise ConfigError(f"MMTM hidden width int(2 * {sum(dims)} / ratio={ratio}) is 0; lower ratio")
        self.fc_squeeze = nn.Linear(dims[0] + dims[1], hidden)
        self.fc_excite = nn.ModuleList([nn.Linear(hidden, dims[0]), nn.Linear(hidden, dims[1])])


class MMTM(nn.Module):
    """Multimodal transfer module (Joze et al., CVPR 2020) on two encoder outputs, built lazily.

    Squeeze: vector ``(B, d)`` as is, sequence ``(B, L, d)`` mean over L, map ``(B, C, h, w)`` mean
    over (h, w). ``Z = ReLU(fc_squeeze([s_0, s_1]))``, gates ``σ(fc_m(Z))`` broadcast over L or
    (h, w). Keeps the running average of each modality's batch-mean gate (training forwards only).
    """

    def __init__(self, ratio: int, seed: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.seed = seed
        self.core: _MMTMCore | None = None
        self._layout: tuple[tuple[str, int], ...] = ()
        self.register_buffer("running_gate_0", torch.zeros(0))
        self.register_buffer("running_gate_1", torch.zeros(0))
        self.register_buffer("gate_steps", torch.zeros(()))
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def built(self) -> bool:
        return self.core is not None

    def _build(self, layout: tuple[tuple[str, int], ...], device: torch.device) -> None:
        dims = (layout[0][1], layout[1][1])
        generator = torch.Generator().manual_seed(self.seed % (2**63))
        self.core = build_with_generator(functools.partial(_MMTMCore, dims, self.ratio), generator, device, torch.float32)
        for name, d in (("running_gate_0", dims[0]), ("running_gate_1", dims[1])):
            if getattr(self, name).shape != (d,):  # already sized (and loaded) when built from a state dict
                setattr(self, name, torch.zeros(d, device=device))
        self._layout = layout

    @staticmethod
    def _squeeze(f: Tensor, kind: str) -> Tensor:
        if kind == "vector":
            return f
        if kind == "sequence":
            return f.mean(dim=1)
        return f.mean(dim=(2, 3))

    @staticmethod
    def _broadcast(gate: Tensor, kind: str) -> Tensor:
        if kind == "vector":
            return gate
        if kind == "sequence":
            return gate[:, None, :]
        return gate[:, :, None, None]

    def forward(self, features: tuple[Tensor, Tensor], curation: Tensor | None = None, caring: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gated features. In training, with ``curation`` true, the cared-for modality's gate is its
        running average (no cross-modal information reaches it)."""
        layout = []
        for i, f in enumerate(features):
            kind = feature_kind(f, f"modality {i}")
            layout.append((kind, int(f.shape[-1] if kind == "sequence" else f.shape[1])))
        layout_t = tuple(layout)
        if not self.built:
            self._build(layout_t, features[0].device)
        elif layout_t != self._layout:
            raise ShapeError(f"MMTM was built for features {self._layout}, got {layout_t}")
        core = self.core
        assert core is not None
        squeezed = torch.cat([self._squeeze(f, k).float() for f, (k, _) in zip(features, layout_t, strict=True)], dim=1)
        z = torch.relu(core.fc_squeeze(squeezed))
        gates = [torch.sigmoid(core.fc_excite[i](z)) for i in range(2)]
        if self.training:
            with torch.no_grad():  # running average of the batch-mean gates (MMTM_mitigate.forward)
                n = self.gate_steps
                self.running_gate_0.copy_((gates[0].mean(0) + self.running_gate_0 * n) / (n + 1))
                self.running_gate_1.copy_((gates[1].mean(0) + self.running_gate_1 * n) / (n + 1))
                self.gate_steps += 1
            if curation is not None and caring is not None:
                running = (self.running_gate_0, self.running_gate_1)
                gates = [
                    torch.where(curation & (caring == i), running[i].expand_as(gates[i]), gates[i]) for i in range(2)
                ]
        out = tuple(
            f * self._broadcast(g, k).to(f.dtype) for f, g, (k, _) in zip(features, gates, layout_t, strict=True)
        )
        return out[0], out[1]

    def get_extra_state(self) -> Tensor:
        rows = [[_KINDS.index(k), d] for k, d in self._layout]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != 2:
            raise ShapeError(f"MMTM extra state must be a (2, 2) layout tensor, got {state!r}")
        if state.shape[0] == 0:
            return
        layout = tuple((_KINDS[int(c)], int(d)) for c, d in state.tolist())
        if self.built:
            if layout != self._layout:
                raise ShapeError(f"saved MMTM layout {layout} differs from this one {self._layout}")
            return
        self._build(layout, self._device_anchor.device)


def _resize_running_gates(module: MMTM, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: size the running-gate buffers like the saved ones before loading."""
    for name in ("running_gate_0", "running_gate_1"):
        key = prefix + name
        if key in state_dict and getattr(module, name).shape != state_dict[key].shape:
            setattr(module, name, torch.zeros_like(state_dict[key], device=module._device_anchor.device))


@register_method("greedy")
class Greedy(Balancer):
    """Greedy-learning mitigation: conditional learning speeds decide curation windows of an MMTM."""

    Config = GreedyConfig
    presets = {
        "modelnet40": {"epsilon": 0.01, "window": 5, "start_epoch": 1},  # configs/training_guided.gin
    }
    tasks = frozenset({"cls", "reg", "seg"})
    min_modalities = 2
    max_modalities = 2
    paper = (
        "Wu, Jastrzębski, Cho, Geras. Characterizing and overcoming the greedy nature of learning in "
        "multi-modal deep neural networks. ICML 2022 (nyukat/greedy_multimodal_learning)"
    )
    grad_edit_scope = frozenset()

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self.__dict__["_model"] = model  # a reference for predict, not a submodule
        self._optimizer_factory = optimizer_factory
        self.mmtm = MMTM(self.config.ratio, seed=int(torch.initial_seed()) + 104729)
        self.mmtm.register_load_state_dict_pre_hook(_resize_running_gates)
        self.mmtm_optimizer: torch.optim.Optimizer | None = None
        self._main = [model.modality_parameters(m) for m in self.modalities]
        # curation state machine (device tensors; moved by balancer.to(device))
        self.register_buffer("m_bypass", torch.zeros(2))
        self.register_buffer("m_main", torch.zeros(2))
        self.register_buffer("d_bdr", torch.zeros(()))
        self.register_buffer("curation", torch.zeros((), dtype=torch.bool))
        self.register_buffer("caring", torch.zeros((), dtype=torch.long))
        self.register_buffer("curation_step", torch.zeros((), dtype=torch.long))
        self._epoch = 0
        self._sums: dict[str, Tensor] = {}
        self._steps = 0

    def on_train_epoch_start(self, ctx: Any) -> None:
        self._epoch = ctx.epoch

    @property
    def unlocked(self) -> bool:
        return self._epoch >= self.config.start_epoch

    # -- forward ----------------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        features, extras = model.encode(batch)
        a, b = self.modalities
        gated = self.mmtm((features[a], features[b]), self.curation, self.caring)
        if self.mmtm_optimizer is None:
            params = list(self.mmtm.parameters())
            self.mmtm_optimizer = self._optimizer_factory(params, lr=self.config.mmtm_lr)
        out = model.fuse({a: gated[0], b: gated[1]}, extras)
        out.features = features
        return out

    def predict(self, output: ModelOutput) -> Tensor:
        """Test-time rule: the model's fusion on MMTM-gated features (no curation at test time)."""
        if not self.mmtm.built:
            raise ConfigError("greedy: the MMTM block is built on the first training step; predict ran before it")
        model: MultimodalModel = self.__dict__["_model"]
        a, b = self.modalities
        gated = self.mmtm((output.features[a], output.features[b]))
        return model.fuse({a: gated[0], b: gated[1]}, output.extras).prediction

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
            self._record(curation=self.curation.float(), caring=self.caring.float())
            return
        compute = ~self.curation if self.unlocked else torch.ones_like(self.curation)
        speeds_main, speeds_byp = [], []
        for main, byp in zip(self._main, self._bypass_groups(), strict=True):
            speeds_main.append(conditional_learning_speed([p.grad for p in main if p.grad is not None], main))
            speeds_byp.append(conditional_learning_speed([p.grad for p in byp if p.grad is not None], byp))
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
        self._record(d_bdr=self.d_bdr, curation=self.curation.float(), caring=self.caring.float())

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if self.mmtm_optimizer is not None:
            step_auxiliary(ctx.scaler, self.mmtm_optimizer)

    # -- diagnostics --------------------------------------------------------------------------------
    def _record(self, **values: Tensor) -> None:
        for name, v in values.items():
            v = v.detach().float()
            self._sums[name] = v if name not in self._sums else self._sums[name] + v
        self._steps += 1

    def diagnostics(self) -> dict[str, float]:
        """Epoch means: d_BDR, fraction of steps in curation, mean cared-for index; and the
        accumulated conditional learning speeds."""
        if not self._sums:
            return {}
        out = {name: float(total / self._steps) for name, total in self._sums.items()}
        out["curation_fraction"] = out.pop("curation")
        for i, m in enumerate(self.modalities):
            out[f"m_main/{m}"] = float(self.m_main[i])
            out[f"m_bypass/{m}"] = float(self.m_bypass[i])
        self._sums, self._steps = {}, 0
        return out
