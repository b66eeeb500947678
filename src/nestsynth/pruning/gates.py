"""Hard concrete gates per weight (Louizos, Welling & Kingma, ICLR 2018), the learned
pruning criterion of the ``l0`` baseline and of NeST's ``pruning.criterion = "l0"``.

The definitions (hard concrete sample, P(z != 0), the test-time gate) and the reasons for
the defaults are documented in :mod:`nestsynth.baselines.regularized`; this module holds
the machinery both share: :class:`L0Gates` (a network computed with ``W * M * z``),
:class:`L0SizeControl` (lam steered to a size) and :func:`keep_most_open` (the projection
to an exact count).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call

from ..metrics import FLOPS_PER_MAC, kernel_positions
from ..sparse import SparseMLP, set_mask
from .magnitude import prune_smallest_global
from .schedules import cubic_count

# Defaults of the gated training (the ``l0`` baseline's [methods.l0] and NeST's
# pruning.criterion = "l0"; why these values: nestsynth.baselines.regularized).
LAM = 0.3  # penalty per expected non-zero weight, times 1/N (paper: 0.1)
DROPRATE = 0.5  # initial log_alpha = log(1 - p) - log(p)
LR_SCALE = 10.0  # learning rate of log_alpha relative to the weights'
GAIN = 0.01  # L0SizeControl's step
RELEASE = 25.0  # L0SizeControl: lam falls this many times faster below the goal than it rises above it
FLOPS_GAIN = 0.002  # FlopsControl's step (at GAIN, mu ran away: x74 per LeNet-5 epoch while E[F] lagged)
FLOPS_MU = 0.1  # FlopsControl's starting mu

# Hard concrete stretch interval (gamma, zeta) and default temperature (Louizos et al., 2018).
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
_U_EPS = 1e-6  # u is kept in [eps, 1 - eps] so that log u and log(1 - u) stay finite


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Gates ``z = min(1, max(0, s * (zeta - gamma) + gamma))`` for uniform noise ``u``.

    Args:
        log_alpha: gate parameters (any shape).
        u: uniform noise of the same shape (clamped to [1e-6, 1 - 1e-6]).
        beta: temperature.

    Returns:
        z in [0, 1], differentiable in ``log_alpha``.
    """
    s = torch.sigmoid((torch.logit(u, eps=_U_EPS) + log_alpha) / beta)  # logit(u) = log u - log(1 - u)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``, the expected L0 per gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic test-time gate ``min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def gated_layer(layer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s pre-normalisation output computed with ``weight`` instead of ``W * M``.

    The layer's own forward runs with ``weight`` and a full mask in place of its tensors
    (``torch.func.functional_call``), so its bias, stride, padding, dilation and area mask
    apply as they do in the layer.

    Args:
        layer: a MaskedLinear or MaskedConv2d.
        weight: (out, in) or (out, in, k, k) weights, e.g. ``W * M * z``.
        x: (B, in) or (B, in, H, W) input.

    Returns:
        (B, out) or (B, out, H', W'): as ``layer(x)`` with the given weights.
    """
    return functional_call(layer, {"weight": weight, "mask": torch.ones_like(layer.mask)}, (x,))


class L0Gates(nn.Module):
    """A SparseMLP, SparseCNN or SparseGraph computed with hard-concrete-gated weights ``W * M * z``.

    ``log_alpha`` of layer i is ``scale * theta[i]`` (see the module docstring for
    why a scale).  In train mode each forward draws fresh gates; in eval mode it
    uses the test-time gates.  The network's own forward runs with every layer's mask
    ``M`` replaced by ``M * z`` (``torch.func.functional_call``): since ``M`` is 0/1, its
    layers compute ``W * (M * z) = W * M * z``, whatever the network's structure.

    Args:
        model: the network whose weights are gated (trained in place).
        log_alpha: initial log_alpha per layer, each of the layer's weight shape.
        beta: temperature.
        scale: log_alpha = scale * theta.
        generator: source of the gate noise.
    """

    def __init__(self, model: SparseMLP, log_alpha: list[torch.Tensor], beta: float = BETA,
                 scale: float = 1.0, generator: torch.Generator | None = None,
                 cost: list[torch.Tensor] | None = None):
        super().__init__()
        self.model, self.beta, self.scale, self.generator = model, beta, scale, generator
        self.theta = nn.ParameterList(nn.Parameter(la.detach().clone() / scale) for la in log_alpha)
        self.cost = cost  # relative penalty per weight (set by FlopsControl), None = 1 for every weight

    def log_alpha(self, i: int) -> torch.Tensor:
        return self.theta[i] * self.scale

    def gate(self, i: int) -> torch.Tensor:
        """Layer i's gates (its weight shape): a fresh sample in train mode, ``z_hat`` in eval mode."""
        la = self.log_alpha(i)
        if not self.training:
            return deterministic_gate(la)
        u = torch.rand(la.shape, generator=self.generator).to(la.device)
        return hard_concrete_sample(la, u, self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, *input_shape) -> (B, classes)
        paths = {id(module): name for name, module in self.model.named_modules()}
        masks = {f"{paths[id(layer)]}.mask": layer.mask * self.gate(i) for i, layer in enumerate(self.model.layers)}
        return functional_call(self.model, masks, (x,))

    def expected_l0(self) -> torch.Tensor:
        """Sum over active connections of P(z != 0) (a scalar tensor)."""
        return sum((prob_nonzero(self.log_alpha(i), self.beta) * layer.mask).sum()
                   for i, layer in enumerate(self.model.layers))

    def penalty(self, lam: float, n_train: int, weight_decay: float = 0.0) -> torch.Tensor:
        """``(1/N) * sum_j P(z_j != 0) * (lam * c_j + 0.5 * weight_decay * w_j**2)`` (paper Eq. 3 + its
        L2; c_j = 1, or the weight's relative cost given as ``cost``)."""
        total = 0.0
        for i, layer in enumerate(self.model.layers):
            cost = lam if self.cost is None else lam * self.cost[i]
            if weight_decay > 0:
                cost = cost + 0.5 * weight_decay * layer.weight.pow(2)
            total = total + (prob_nonzero(self.log_alpha(i), self.beta) * layer.mask * cost).sum()
        return total / n_train

    @torch.no_grad()
    def fold_into(self, model: SparseMLP) -> SparseMLP:
        """Fold the test-time gates into ``model`` (this one's network or a copy of it).

        mask <- mask * (z_hat > 0), weight <- weight * z_hat.

        Returns:
            ``model``, now equal to this module's eval-mode network.
        """
        for i, layer in enumerate(model.layers):
            z_hat = deterministic_gate(self.log_alpha(i))
            layer.weight.mul_(z_hat)
            set_mask(layer, layer.mask * (z_hat > 0).to(layer.mask.dtype))
        return model

    def deterministic_model(self) -> SparseMLP:
        """A gated copy of the network (for logging; the network itself is untouched)."""
        return self.fold_into(copy.deepcopy(self.model))


class L0SizeControl:
    """``after_step`` hook that steers L0's lam to a size (``[methods.l0] target_weights``,
    and NeST's ``pruning.criterion = "l0"``).

    Louizos et al. choose lam and take the size it gives.  To compare methods at equal
    size, lam is instead adjusted after every optimizer step, multiplicatively, by how far
    the expected L0 is from a goal that falls on a cubic schedule
    from the starting count to the target over the first ``share`` of training (two
    thirds, as gradual pruning's) and then stays there: ``lam *= exp(gain * clip(E[L0] / goal - 1, -1, 1))``.
    The expected L0 (the penalty's own measure) is steered rather than the count of open
    test-time gates because it answers at once, where the count lags and makes lam
    overshoot; a closed gate gets no gradient from the data, so an overshoot cannot be
    undone.  A Lagrangian-style controller, like the target-sparsity control of later L0 work.

    Below the goal lam falls ``release`` times as fast as it rises above it,
    ``lam *= exp(release * gain * (E[L0] / goal - 1))``: lam climbs by orders of magnitude while
    the expected size lags the falling goal, and at the symmetric rate it then needed epochs to
    come down, during which gates went on closing (LeNet-300-100 / MNIST: E[L0] ended 8-17% below
    the goal in every run at ``release = 1``, so the last third of the training ran on a network
    smaller than the target and the projection gave the difference back at weight 0).

    Args:
        gates: the gated network.
        lam: the starting lam.
        target: weights the test-time gates should keep at the end.
        steps: optimizer steps of the whole training.
        gain: the controller's step.
        share: share of ``steps`` over which the goal falls.
        release: how many times faster lam falls below the goal than it rises above it
            (1: symmetric, the controller before this option).
    """

    def __init__(self, gates: L0Gates, lam: float, target: int, steps: int, gain: float,
                 share: float = 2.0 / 3.0, release: float = RELEASE):
        self.gates, self.lam, self.gain, self.step = gates, max(lam, 1e-6), gain, 0
        self.release = release
        start = sum(int(layer.mask.sum()) for layer in gates.model.layers)
        sched = max(1, round(share * steps))
        self.goal = lambda t: max(1, cubic_count(t, start, min(target, start), sched))

    def __call__(self) -> None:
        with torch.no_grad():
            ratio = float(self.gates.expected_l0()) / self.goal(self.step)
        error = min(max(ratio - 1.0, -1.0), 1.0)
        self.lam *= math.exp(self.gain * error * (self.release if error < 0 else 1.0))
        self.lam = min(max(self.lam, 1e-6), 1e9)
        self.step += 1


def macs_per_weight(layer) -> torch.Tensor:
    """Multiply-accumulates one inference spends on each weight of ``layer`` (its weight
    shape): a convolution weight of kernel n costs the output positions kernel n computes
    (its partial area, :func:`nestsynth.metrics.kernel_positions`), any other weight 1 (the
    convention of :func:`nestsynth.metrics.conv_macs`)."""
    w = layer.weight.detach()
    if w.dim() != 4 or getattr(layer, "area", None) is None:
        return torch.ones_like(w)
    return kernel_positions(layer).to(w.dtype).view(-1, 1, 1, 1).expand_as(w).clone()


class FlopsControl:
    """``after_step`` hook that prices the gates by the FLOPs their weights cost and steers
    that price so the expected FLOPs follow a cubic schedule down to a FLOP target (NeST's
    ``pruning.target_flops``; not in Louizos et al., who price every weight alike).

    A gate's penalty becomes ``lam * (1 + mu * m_j / m_bar) / c`` (``L0Gates.cost``): m_j the
    multiply-accumulates its weight costs per inference (:func:`macs_per_weight`), m_bar
    their mean over the live weights when the phase began, and c the mean of the numerator
    over the expected open gates (``sum_j P_j (1 + mu m_j / m_bar) / sum_j P_j``, renewed
    every step), so the prices only shift pressure from costly weights to cheap ones and
    the total penalty of the current network stays the plain one.  ``mu`` is a second multiplier,
    updated like :class:`L0SizeControl`'s lam, ``mu *= exp(gain * clip(E[F] / goal - 1, -1, 1))``
    with ``E[F] = 2 * sum_j P(z_j != 0) * m_j`` (the paper's 2 FLOPs per MAC, inputs taken
    as dense): while the expected FLOPs are above their schedule, weights that cost many
    FLOPs (a LeNet-5 conv1 weight computes 576 positions, an fc weight one) pay more and
    cheap ones less; once below, mu decays and the penalty returns to the plain expected L0.
    (Without the normalization, a rising mu raised every price and the network fell below
    its size target: LeNet-5, 5.8K weights, 95K FLOPs, seed 0 reached 4.2K.)  The size control
    is untouched, so the run still ends at ``target_weights``; the FLOP target is steered,
    not guaranteed.

    Args:
        gates: the gated network (its ``cost`` is set here).
        target: FLOPs the gated network should cost at the end.
        steps: optimizer steps of the whole gated training.
        gain: the controller's step.
        share: share of ``steps`` over which the goal falls.
        mu, start, scale, step: the controller's state (a new phase: mu = FLOPS_MU, start = the
            network's FLOPs, scale = m_bar; a resumed phase passes what it saved).
    """

    def __init__(self, gates: L0Gates, target: float, steps: int, gain: float, share: float = 2.0 / 3.0,
                 mu: float = FLOPS_MU, start: float | None = None, scale: float | None = None, step: int = 0):
        self.gates, self.target, self.gain, self.mu, self.step = gates, float(target), gain, mu, step
        layers = gates.model.layers
        self.macs = [macs_per_weight(layer) for layer in layers]
        live = sum(float(layer.mask.sum()) for layer in layers)
        live_macs = sum(float((m * layer.mask).sum()) for m, layer in zip(self.macs, layers))
        self.scale = scale if scale is not None else max(live_macs / max(live, 1.0), 1e-12)
        self.start = start if start is not None else FLOPS_PER_MAC * live_macs
        sched = max(1, round(share * steps))
        self.goal = lambda t: max(1.0, cubic_count(t, self.start, min(self.target, self.start), sched))
        self.apply()

    def refresh(self) -> None:
        """Re-read every weight's MACs (after partial-area convolution switched positions off)."""
        self.macs = [macs_per_weight(layer) for layer in self.gates.model.layers]
        self.apply()

    @torch.no_grad()
    def _open(self) -> list[torch.Tensor]:
        """P(z_j != 0) of every live weight (0 where dormant), per layer."""
        return [prob_nonzero(self.gates.log_alpha(i), self.gates.beta) * layer.mask
                for i, layer in enumerate(self.gates.model.layers)]

    @torch.no_grad()
    def apply(self, p: list[torch.Tensor] | None = None) -> None:
        """Set the gates' relative prices from the current ``mu``, normalized so that their
        mean over the expected open gates (``p``: :meth:`_open`, computed when not given) is
        1: the price moves pressure from weights that cost many FLOPs to cheap ones without
        changing the penalty of the current network (the size controller's lam keeps its
        meaning)."""
        p = self._open() if p is None else p
        raw = [1.0 + (self.mu / self.scale) * m for m in self.macs]
        mean = sum(float((pi * r).sum()) for pi, r in zip(p, raw)) / max(sum(float(pi.sum()) for pi in p), 1e-12)
        self.gates.cost = [r / max(mean, 1e-12) for r in raw]

    @torch.no_grad()
    def expected_flops(self, p: list[torch.Tensor] | None = None) -> float:
        """``2 * sum_j P(z_j != 0) * m_j`` over the live weights (``p`` as in :meth:`apply`)."""
        p = self._open() if p is None else p
        return FLOPS_PER_MAC * sum(float((pi * m).sum()) for pi, m in zip(p, self.macs))

    def __call__(self) -> None:
        p = self._open()  # one pass over the gates per optimizer step, for both uses
        ratio = self.expected_flops(p) / self.goal(self.step)
        self.mu *= math.exp(self.gain * min(max(ratio - 1.0, -1.0), 1.0))
        self.mu = min(max(self.mu, 1e-9), 1e9)
        self.step += 1
        self.apply(p)

    def state(self) -> dict:
        """What a resumed phase passes back to the constructor."""
        return {"mu": self.mu, "start": self.start, "scale": self.scale, "step": self.step}


def initial_log_alpha(model, droprate: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Per layer (its weight shape): ``log(1 - p) - log(p)`` plus N(0, 0.01^2) noise drawn
    from ``generator``, p = ``droprate`` (the reference code's ``droprate_init``)."""
    base = math.log(1 - droprate) - math.log(droprate)
    return [base + 0.01 * torch.randn(layer.weight.shape, generator=generator) for layer in model.layers]


def theta_scale(gate_lr_scale: float, optimizer: str) -> float:
    """The ``scale`` of :class:`L0Gates` that makes log_alpha move ``gate_lr_scale`` times as
    fast as the weights: ``gate_lr_scale`` under Adam (invariant to gradient scale), its
    square root under SGD (where the step scales with ``scale**2``)."""
    return math.sqrt(gate_lr_scale) if optimizer == "sgd" else gate_lr_scale


@torch.no_grad()
def keep_most_open(gates: L0Gates, keep: int) -> None:
    """Fold the gates, keeping exactly ``keep`` weights: those with the largest log_alpha.

    A kept weight is ``w * z_hat``, or ``w`` where its test-time gate ``z_hat`` is 0.
    """
    layers = gates.model.layers
    scores = [gates.log_alpha(i).detach() for i in range(len(layers))]
    masks = [layer.mask for layer in layers]
    live = sum(int(m.sum()) for m in masks)
    new = prune_smallest_global(scores, masks, live - keep, [1] * len(layers))
    for i, (layer, mask) in enumerate(zip(layers, new)):
        z_hat = deterministic_gate(scores[i])
        layer.weight.mul_(torch.where(z_hat > 0, z_hat, torch.ones_like(z_hat)))
        set_mask(layer, mask)
