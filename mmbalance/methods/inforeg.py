"""``inforeg``: Information Acquisition Regulation (Huang, Wei, Yang, Hu; "Adaptive Unimodal Regulation
for Balanced Multimodal Information Acquisition", CVPR 2025).

The prime learning window is open while the encoders' Fisher-information trace still grows fast:
``k = (tr̄_new − tr̄_old) / tr̄_new > 0.05`` over means of the last 10 epochs' traces
(``tr = Σ_layers mean(Σ_steps g²)``). Inside it, the information-sufficient modality (higher
confidence ``s_m = Σ_i p(y_i | x_i^m)``) is slowed by a proximal gradient toward the weights at the
start of the epoch: ``g_m ← g_m + β_m (θ_m − θ_m^prev)``, ``β_m = c_m exp(tanh(s_m − s_other))``.
The unimodal losses are backpropagated into the encoders too.

Port of ``GeWu-Lab/InfoReg_CVPR2025:main.py`` (``train_epoch``, ``main``). Deviations
(``methods/inforeg.md``): unimodal predictions from our own linear heads (official: slices of the
concat head); the window reads all encoders' trace by default (official: the audio encoder's,
``window_trace``); one ``c`` for every modality unless ``beta_by_modality`` gives the official
0.95 / 0.1; more than two modalities compare each score with the mean of the others; reg/seg
confidence ``Σ exp(−ℓ_i)``; a zero trace closes the window instead of dividing by zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import present_grads
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods.ogm_ge import confidence_score
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["InfoReg", "InfoRegConfig", "window_signal", "proximal_coefficients", "fisher_trace"]


@dataclass(frozen=True)
class InfoRegConfig(HeadConfig):
    beta: float = 0.95  # c in β = c·exp(tanh(gap)) for every modality (main.py: 0.95 for audio)
    beta_by_modality: Mapping[str, float] = field(default_factory=dict)  # c by modality (visual 0.1)
    window_threshold: float = 0.05  # the window is open while k > threshold (main.py: `k > 0.05`)
    window_length: int = 10  # epochs in each trace mean (main.py: sum(trace_list[-10:]) / 10)
    window_trace: str = "encoders"  # trace read by the window: all encoders' sum, or one modality's
    unimodal_grad: bool = True  # unimodal losses reach the encoders (main.py backpropagates loss_out_a/v)
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's LR)
    head_hidden: int | None = None  # None: linear heads, like the official slices of the linear head
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, finite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0")
        for m, c in self.beta_by_modality.items():
            if not (finite(c) and c >= 0):
                raise ValueError(f"beta_by_modality[{m!r}] must be a finite number >= 0, got {c!r}")
        need(self, finite(self.window_threshold), "window_threshold", "a finite number")
        need(self, self.window_length >= 1, "window_length", "an integer >= 1")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_inforeg.py) -------------
def window_signal(traces: Sequence[float], length: int) -> float:
    """``k = (tr̄_new − tr̄_old) / tr̄_new`` from the per-epoch traces so far (oldest first), where
    ``tr̄_new`` is the mean of the last ``length`` records and ``tr̄_old`` the mean of the ``length``
    before the newest, the record list starting with ``length`` zeros (main.py). ``1`` before any
    epoch; ``0`` when ``tr̄_new`` is 0 (nothing learned: the window is closed)."""
    if not traces:
        return 1.0
    padded = [0.0] * length + [float(t) for t in traces]
    new = sum(padded[-length:]) / length
    old = sum(padded[-length - 1:-1]) / length
    return (new - old) / new if new > 0 else 0.0


def proximal_coefficients(scores: Tensor, base: Tensor) -> Tensor:
    """``β_m = c_m exp(tanh(gap_m))`` where ``gap_m = s_m − mean_{n≠m} s_n > 0``, else 0: ``(M,)``.
    For two modalities exactly one (the more confident) is regulated, none on a tie."""
    m = scores.shape[0]
    if m < 2:
        raise ConfigError(f"inforeg compares modalities: needs at least 2 scores, got {m}")
    gap = scores - (scores.sum() - scores) / (m - 1)
    return torch.where(gap > 0, base * torch.exp(torch.tanh(gap)), torch.zeros_like(scores))


def fisher_trace(grads: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """One step's contribution ``Σ_layers mean(g²)`` to the Fisher-information trace (0-d, float64).
    ``sizes`` (the tensors' element counts, float64 on their device) may be passed to avoid a
    host-to-device copy per call."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(list(grads))).double()
    if sizes is None:
        sizes = torch.tensor([g.numel() for g in grads], dtype=torch.float64, device=norms.device)
    return (norms * norms / sizes).sum()


@register_method("inforeg")
class InfoReg(HeadedBalancer):
    """InfoReg: inside the prime learning window, pull the more confident encoder toward its
    epoch-start weights."""

    Config = InfoRegConfig
    presets = {  # main.py constants for the audio-visual datasets (CREMA-D, Kinetics-Sounds)
        "cremad": {"beta_by_modality": {"audio": 0.95, "visual": 0.1}, "window_trace": "audio"},
        "kineticsound": {"beta_by_modality": {"audio": 0.95, "visual": 0.1}, "window_trace": "audio"},
        "synthetic": {"window_length": 2},  # 10 of main.py's 50 epochs, scaled to the benchmark's 8
    }
    grad_edit_scope = frozenset({"encoders"})
    paper = "Huang et al., CVPR 2025 (GeWu-Lab/InfoReg_CVPR2025)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        cfg: InfoRegConfig = self.config
        self.heads_detach = not cfg.unimodal_grad  # read by make_heads in HeadedBalancer.setup
        super().setup(model, task, optimizer_factory)
        known = set(self.modalities)
        unknown = sorted(set(cfg.beta_by_modality) - known)
        if unknown:
            raise ConfigError(
                f"inforeg beta_by_modality names unknown modalities {unknown}; model has {self.modalities}"
            )
        if cfg.window_trace != "encoders" and cfg.window_trace not in known:
            raise ConfigError(
                f"inforeg window_trace must be 'encoders' or a modality of {self.modalities}, "
                f"got {cfg.window_trace!r}"
            )
        self._params = {m: model.modality_parameters(m) for m in self.modalities}
        # Fisher trace over weight matrices and kernels (main.py: Conv2d / Linear weights)
        self._fisher = {m: [p for p in self._params[m] if p.dim() >= 2] for m in self.modalities}
        base = [float(cfg.beta_by_modality.get(m, cfg.beta)) for m in self.modalities]
        self.register_buffer("base", torch.tensor(base), persistent=False)
        self._sizes: dict[tuple[Any, ...], Tensor] = {}
        self._traces: list[list[float]] = []  # per finished epoch: trace of each modality
        # The running epoch's Fisher trace and the encoders' epoch-start copies θ^prev (one flat
        # buffer per encoder, counted in the method's memory): persistent, so a resumed run goes on.
        self.register_buffer("trace_sum", torch.zeros(len(self.modalities), dtype=torch.float64))
        self.register_buffer("trace_steps", torch.zeros((), dtype=torch.long))
        for i, m in enumerate(self.modalities):
            numel = sum(p.numel() for p in self._params[m])
            self.register_buffer(f"prev_{i}", torch.zeros(numel, dtype=self._params[m][0].dtype))
        self._snapshot: dict[str, list[Tensor]] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module._view_snapshot())
        self._window, self._k = True, 1.0
        self._scores: Tensor | None = None

    # -- epoch level ------------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Close the finished epoch's trace, decide the window, snapshot the encoders (θ^prev)."""
        cfg: InfoRegConfig = self.config
        if int(self.trace_steps):  # one host read per epoch
            self._traces.append(self.trace_sum.tolist())
            self.trace_sum.zero_()
            self.trace_steps.zero_()
        if cfg.window_trace == "encoders":
            series = [sum(row) for row in self._traces]
        else:
            series = [row[self.modalities.index(cfg.window_trace)] for row in self._traces]
        self._k = window_signal(series, cfg.window_length)
        self._window = self._k > cfg.window_threshold
        for i, m in enumerate(self.modalities):
            torch.cat([p.detach().reshape(-1) for p in self._params[m]], out=getattr(self, f"prev_{i}"))
        self._view_snapshot()

    def _view_snapshot(self) -> None:
        """θ^prev of each encoder as views of its flat buffer, shaped like the parameters."""
        for i, m in enumerate(self.modalities):
            views = getattr(self, f"prev_{i}").split([p.numel() for p in self._params[m]])
            self._snapshot[m] = [v.view_as(p) for v, p in zip(views, self._params[m], strict=True)]

    # -- training step ----------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task`` and ``unimodal/<m>`` (HeadedBalancer); records the confidences ``s_m``."""
        target = batch["target"]
        predictions = self.unimodal_predictions(output, batch)
        terms = {"task": task.loss(output.prediction, target)}
        terms.update(self.heads.loss_terms(predictions, target, task))
        with torch.no_grad():
            scores = [confidence_score(predictions[m].detach(), target, task) for m in self.modalities]
            self._scores = torch.stack(scores)
        return terms

    def on_after_backward(self, ctx: StepContext) -> None:
        """Inside the window add ``β_m (θ − θ^prev)`` to encoder m's gradient; then add the step's
        ``Σ mean(g²)`` per modality to the epoch's Fisher trace (after the proximal term, as main.py)."""
        if self._scores is None or not self._snapshot:
            raise ConfigError("inforeg: on_after_backward needs on_train_epoch_start and loss_terms first")
        beta = torch.zeros_like(self.base)
        if self._window:
            beta = proximal_coefficients(self._scores.float(), self.base)
            for i, m in enumerate(self.modalities):
                params = zip(self._params[m], self._snapshot[m], strict=True)
                pairs = [(p, s) for p, s in params if p.grad is not None]
                if pairs:
                    pull = torch._foreach_sub([p.detach() for p, _ in pairs], [s for _, s in pairs])
                    torch._foreach_mul_(pull, beta[i].to(pull[0].dtype))
                    torch._foreach_add_([p.grad for p, _ in pairs], pull)
        trace = torch.stack([self._step_trace(m) for m in self.modalities])
        trace = torch.nan_to_num(trace, nan=0.0, posinf=0.0, neginf=0.0)  # steps the AMP scaler skips
        self.trace_sum += trace
        self.trace_steps += 1
        self.epoch_means.update(beta=beta, score=self._scores)

    def _step_trace(self, m: str) -> Tensor:
        grads = present_grads(self._fisher[m])
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.base.device)
        key = (m, tuple(g.numel() for g in grads), grads[0].device)
        if key not in self._sizes:  # element counts on the device, built once per layout
            self._sizes[key] = torch.tensor(key[1], dtype=torch.float64, device=key[2])
        return fisher_trace(grads, self._sizes[key])

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of β_m (``beta/<m>``) and s_m (``score/<m>``), the window signal ``k`` and
        ``window`` (1 open, 0 closed) of the epoch."""
        return {**self.epoch_means.pop(), "k": self._k, "window": float(self._window)}

    def host_state(self) -> dict[str, Any]:
        """Finished epochs' traces and this epoch's window decision."""
        return {"traces": [list(row) for row in self._traces], "window": self._window, "k": self._k}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._traces = [[float(v) for v in row] for row in state.get("traces", [])]
        self._window, self._k = bool(state["window"]), float(state["k"])
