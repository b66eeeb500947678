"""Magnitude baselines: dense, random, Han et al. 2015, one-shot, gradual (Zhu & Gupta 2017)
and lottery tickets (Frankle & Carbin 2019).

Every method scores a connection by its weight magnitude ``|w|`` (the raw weight, not
divided by a batch-norm scale) and turns scores and the current mask into a new mask
with one of the pure rules below (``random_mask``, ``topk_mask``, :func:`~nestsynth.select.keep_top_masks`,
``prune_rate_mask``, ``han_mask``); the run functions only sequence training and rules.
Pruning never revives: every rule returns a subset of the mask it is given.
Sparsity counts weights only (biases are never pruned).

CNN references (``SparseCNN``, e.g. ``tiny-cnn``, ``lenet-5``): every method here works
on them unchanged.  A conv layer's weight is (out, in, k, k); its ``n_l`` is the number
of kernel weights and every count or top-k runs over the flattened weights (row-major,
the order of the (out, in*k*k) matrix), so "per layer" rules (random, oneshot/gradual
scope "layer", Han's threshold, lottery rates) treat conv and linear layers alike, and
"global" rules rank conv and linear weights together by ``|w|``.  Conv layers are hidden
layers: Han uses the hidden ``q`` for them and lottery the hidden ``rate`` (Frankle &
Carbin prune their Conv-2/4/6 conv layers at 10-15% per round: set ``rate`` for that).
Area masks of partial-area convolution are not touched (baselines prune weights only).

Graph references (``SparseGraph``, e.g. ``resnet20``, or a user's residual network): the
same, over ``model.layers`` in graph order; "the output layer" (Han's output ``q``,
lottery's ``output_rate``) is the last weight layer in that order (the classifier of a
ResNet); the projection shortcuts are hidden layers like the others.

dense
    Definition followed: train the reference architecture for ``epochs``; no pruning.
    Recorded as the dense reference.

random
    Definition followed: a control.  Each layer keeps exactly ``round(n * (1 - sparsity))``
    of its ``n`` weights, a uniform random choice drawn from the run's generator at
    initialization (no per-neuron guarantee), then the sparse net trains for ``epochs``.
    Default sparsity 0.8, below the pruning methods' 0.9: on digits' 64-64-32-10 a uniform
    mask at 0.9 leaves the output layer 32 weights and about half of the last hidden layer
    without an output (test error 20-49% over seeds 0-2; 3.1-5.3% at 0.8).

han (seed 003; Han, Pool, Tran & Dally, NIPS 2015)
    Definition followed: train dense with L2 regularization (``weight_decay``); then
    ``iterations`` times: prune every live weight with ``|w| < q_k * sigma_l`` and retrain
    ``retrain_epochs`` with the mask fixed and L2 still on.  ``sigma_l`` is the standard
    deviation (unbiased, over all entries) of layer ``l``'s weights in the trained *dense*
    network, computed once before the first pruning, as Distiller's SensitivityPruner does
    (it caches the std at the first pruning); the threshold is then an absolute value that
    grows with ``q_k``, so every iteration prunes a predictable further share.  (Using the
    std of the surviving weights instead would make the threshold ratchet up by itself,
    since removing the small weights inflates the std.)
    ``q_k = quality + k * quality_step`` (k = 0 .. iterations-1) for the hidden layers;
    the output layer uses ``q_k * quality_output_scale`` (Han et al. keep 26% of
    LeNet-300-100's output layer against 8-9% of the hidden ones).
    Defaults and why: for a zero-mean weight distribution with std sigma, |w| < q*sigma
    removes q/sqrt(3) of a uniform, erf(q/sqrt 2) of a Gaussian and 1 - exp(-q sqrt 2) of a
    Laplacian layer: about 92% (Han's ~8% kept, 12x) for q ~ 1.6-1.8.  Trained LeNet-300-100
    layers are more peaked at zero than that (the weights of never-lit MNIST pixels decay
    to ~0 under L2), so the final q must be a little larger; the defaults quality = 0.8,
    quality_step = 0.275 give q = 0.8, 1.075, 1.35, 1.625, 1.9 over five iterations and the
    output layer (scale 0.75) ends at q = 1.425.  Measured on MNIST (seed 0, 10% validation,
    Adam 1e-3, retraining at 0.1 of it): 8.2% / 9.8% / 25.7% of the three layers kept, 8.5%
    in all (11.8x; Han et al.: 8% / 9% / 26%, 12x), validation error 2.5% against 2.2% dense.
    The retraining runs at ``retrain_lr_scale`` = 1.0 of the training learning rate (Adam's
    steps do not grow with the gradient, so a full-rate retraining is not the large SGD step
    Han et al. decay from): with 0.1, digits' 64-64-32-10 cannot recover from the last
    two cuts (35% test error at 571 weights; 1.0: 6.4% at 883); on MNIST 1.0 gives 1.79%
    test error at 21.1K weights (7.4% / 11.2% / 40.0% kept), 0.1 gives 2.31% at 22.5K.
    Deviations: no dropout-ratio adjustment (the reference nets have no dropout); the
    optimizer is ``cfg.train``'s (Adam by default, L2 added to the gradient) instead of SGD;
    a layer always keeps its largest live weight, so a too-large ``quality`` cannot
    disconnect the network.

oneshot
    Definition followed: train dense for ``dense_epochs``, prune once to exactly
    ``sparsity`` by ``|w|`` and fine-tune ``finetune_epochs``.  Scope "layer": each layer
    keeps ``round(n_l * (1 - sparsity))`` (its total equals ``round(N * (1 - sparsity))``
    whenever every ``n_l * (1 - sparsity)`` is an integer, as for LeNet-300-100 at 0.95);
    scope "global": the ``round(N * (1 - sparsity))`` largest weights of the whole net.

gradual (seed 002; Zhu & Gupta 2017, "To prune or not to prune")
    Definition followed: during training, every ``frequency`` optimizer steps t in
    [t0, t0 + n dt] each layer is pruned by ``|w|`` to sparsity
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` with ``t0 = begin_epoch`` and
    ``t0 + n dt = end_epoch`` (in steps; the end step is always a pruning step even when
    ``n dt`` is not a multiple of ``frequency``), i.e. keeps ``round(n_l (1 - s_t))``.
    Training continues with the final mask to ``epochs``.  From scratch (mask of ones) by
    default, or after ``dense_epochs`` of dense training.  The step counter counts the
    optimizer steps of the pruning phase, so step t is "after t updates".
    Deviations: none beyond the optimizer (``cfg.train``'s, one optimizer for the whole
    phase, its state zeroed at pruned positions).  Option: ``scope = "lamp"`` ranks LAMP
    scores (Lee et al. 2021, |w|^2 over the sum of the squares of the layer's larger
    weights) over the whole network: raw |w| ("global") drifts apart between layers in long
    runs and starves the output layer (338 epochs: 46 weights left in fc3 at 7.7K, against
    208 in 60 epochs).

lottery (seed 003; Frankle & Carbin, ICLR 2019)
    Definition followed: iterative magnitude pruning with resetting.  Each round trains
    ``epochs_per_round`` from the ticket, prunes ``round(rate * live)`` of each hidden
    layer's live weights (output layer ``output_rate``; F&C use 20% and 10% for
    LeNet-300-100), then resets every parameter (weights, biases, batch norm) to its
    initial value, or with ``rewind_steps`` > 0 to its value after that many optimizer
    steps of the first round (late resetting / rewinding, Frankle et al. 2019), with the
    new mask applied.  After ``rounds`` rounds the last ticket trains once more for
    ``epochs_per_round``.  Every round starts a new optimizer (its state is reset) and a
    new learning-rate schedule, as in F&C where every round is a fresh training run.  The
    first round trains the dense network; it is recorded as the dense reference.
    Deviations: none.  Note that the default 5 rounds keep 0.8^5 = 33% of the hidden
    weights; 14 rounds reach about 95% sparsity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import check
from ..errors import NestError
from ..pruning import lamp_scores, prune_smallest
from ..select import keep_top_masks
from ..sparse import SparseMLP, set_mask
from .registry import register_method


# ---- pure mask rules ----------------------------------------------------------
def keep_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights survive at ``sparsity``: ``round(n * (1 - sparsity))``."""
    return int(round(n * (1.0 - sparsity)))


def random_mask(shape, keep: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask with exactly ``keep`` ones at uniformly random positions.

    Args:
        shape: (out, in) of a linear layer or (out, in, k, k) of a conv layer.
        keep: number of ones (clipped to [0, numel]).
        generator: source of the randomness.

    Returns:
        Float mask of ``shape``.
    """
    n = math.prod(shape)
    mask = torch.zeros(n)
    mask[torch.randperm(n, generator=generator)[:min(max(keep, 0), n)]] = 1.0
    return mask.view(*shape)


def topk_mask(scores: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` live connections with the largest scores (never revives).

    Args:
        scores: importance of the layer's weights, e.g. ``|w|`` ((out, in) or (out, in, k, k)).
        mask: the current 0/1 mask, same shape.
        keep: how many live connections survive (more than are live keeps them all).

    Returns:
        The new mask, a subset of ``mask``.
    """
    return prune_smallest(scores, mask, int(mask.sum()) - keep)


def prune_rate_mask(scores: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Remove ``round(rate * live)`` of the live connections, the smallest scores first.

    Returns:
        The new mask, a subset of ``mask``.
    """
    return prune_smallest(scores, mask, int(round(rate * float(mask.sum()))))


def han_mask(weight: torch.Tensor, mask: torch.Tensor, quality: float, std: float) -> torch.Tensor:
    """Han et al.'s rule: a live weight survives when ``|w| >= quality * std``.

    At least one live weight (the largest) always survives, so a layer is never cut off.

    Args:
        weight: the layer's weights ((out, in) or (out, in, k, k)).
        mask: the current 0/1 mask, same shape.
        quality: the quality parameter (threshold in units of ``std``).
        std: the layer's weight standard deviation (see :func:`layer_std`).

    Returns:
        The new mask, a subset of ``mask``.

    Example:
        >>> han_mask(torch.tensor([[0.5, -2.0]]), torch.ones(1, 2), 1.0, 1.0)
        tensor([[0., 1.]])
    """
    new = mask * (weight.abs() >= quality * std).to(mask.dtype)
    if new.sum() == 0 and mask.sum() > 0:
        new = topk_mask(weight.abs(), mask, 1)
    return new


def layer_std(weight: torch.Tensor) -> float:
    """Standard deviation of all entries of a weight tensor (unbiased, as ``torch.std``)."""
    return float(weight.detach().std())


def gradual_sparsity(step: int, begin: int, end: int, frequency: int, initial: float,
                     final: float) -> float | None:
    """Zhu & Gupta's target sparsity at optimizer step ``step``, or None off the schedule.

    ``s_t = final + (initial - final) * (1 - (t - begin) / (end - begin))^3`` at the steps
    ``t = begin + j * frequency <= end`` and at ``t = end``.

    Args:
        step: optimizer steps done so far.
        begin, end: first and last pruning step (``end > begin``).
        frequency: steps between two pruning events.
        initial, final: s_i and s_f.

    Returns:
        The target sparsity, or None when ``step`` is not a pruning step.
    """
    if step < begin or step > end or ((step - begin) % frequency and step != end):
        return None
    return final + (initial - final) * (1.0 - (step - begin) / (end - begin)) ** 3


# ---- helpers on models ------------------------------------------------------------
def magnitudes(model: SparseMLP) -> list[torch.Tensor]:
    """``|w|`` of every layer (dormant entries are 0)."""
    return [layer.weight.detach().abs() for layer in model.layers]


def install_masks(model: SparseMLP, masks: list[torch.Tensor], optimizer=None) -> None:
    """Install one mask per layer (dormant weights and their optimizer state zeroed)."""
    for layer, mask in zip(model.layers, masks):
        set_mask(layer, mask, optimizer)


def layer_masks(model: SparseMLP, sparsity: float) -> list[torch.Tensor]:
    """Per layer: keep the ``round(n_l * (1 - sparsity))`` largest ``|w|``."""
    return [topk_mask(s, layer.mask, keep_count(layer.mask.numel(), sparsity))
            for s, layer in zip(magnitudes(model), model.layers)]


def snapshot(model: SparseMLP) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer except the masks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("mask")}


def reset_to(model: SparseMLP, state: dict[str, torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Load ``state`` (from :func:`snapshot`) and install ``masks``: weights become state * mask."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("mask") for k in missing):
        raise ValueError(f"snapshot does not match the model: {missing} {unexpected}")
    for layer, mask in zip(model.layers, masks):
        layer.mask.fill_(1.0)  # so set_mask multiplies the restored weights by the new mask
        set_mask(layer, mask)


def steps_per_epoch(ctx) -> int:
    """Optimizer steps in one epoch of ``ctx.train`` (``train.min_steps_per_epoch`` at least)."""
    return ctx.steps_per_epoch()


# ---- dense --------------------------------------------------------------------
@dataclass
class DenseMethodConfig:
    """[methods.dense]: the reference architecture trained dense."""

    epochs: int = 30

    def validate(self, prefix: str) -> None:
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, ">= 1")


@register_method("dense", DenseMethodConfig, "dense reference, no pruning")
def run_dense(ctx, mcfg: DenseMethodConfig) -> SparseMLP:
    """Train the dense reference for ``mcfg.epochs``."""
    model = ctx.train_dense(mcfg.epochs)
    ctx.log("final", 0, model)
    return model


# ---- random -------------------------------------------------------------------
@dataclass
class RandomMethodConfig:
    """[methods.random]: a uniformly random sparse mask fixed at initialization."""

    sparsity: float = 0.8  # a uniform mask at 0.9 leaves half of a small last layer without output
    epochs: int = 30

    def validate(self, prefix: str) -> None:
        check(0 <= self.sparsity < 1, f"{prefix}.sparsity", self.sparsity, "in [0, 1)")
        check(self.epochs >= 0, f"{prefix}.epochs", self.epochs, ">= 0")


@register_method("random", RandomMethodConfig, "control: random mask per layer at init, then training")
def run_random(ctx, mcfg: RandomMethodConfig) -> SparseMLP:
    """Each layer keeps ``round(n (1 - sparsity))`` random weights; train ``epochs``."""
    model = ctx.dense_model()
    masks = [random_mask(layer.mask.shape, keep_count(layer.mask.numel(), mcfg.sparsity), ctx.generator)
             for layer in model.layers]
    install_masks(model, [m.to(ctx.device) for m in masks])
    ctx.log("prune", 0, model)
    ctx.train(model, mcfg.epochs)
    ctx.log("final", 1, model)
    return model


# ---- Han et al. 2015 ---------------------------------------------------------------
@dataclass
class HanMethodConfig:
    """[methods.han]: iterative |w| < quality * std pruning with L2 retraining."""

    dense_epochs: int = 20
    weight_decay: float = 1e-4  # L2 during dense training and every retraining
    iterations: int = 5
    quality: float = 0.8  # q at the first iteration, in units of the dense layer's std
    quality_step: float = 0.275  # q grows by this much per iteration
    quality_output_scale: float = 0.75  # the output layer's q relative to the hidden layers'
    retrain_epochs: int = 4
    retrain_lr_scale: float = 1.0

    def validate(self, prefix: str) -> None:
        check(self.dense_epochs >= 1, f"{prefix}.dense_epochs", self.dense_epochs, ">= 1")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "non-negative")
        check(self.iterations >= 1, f"{prefix}.iterations", self.iterations, ">= 1")
        check(self.quality > 0, f"{prefix}.quality", self.quality, "positive")
        check(self.quality_step >= 0, f"{prefix}.quality_step", self.quality_step, "non-negative")
        check(self.quality_output_scale > 0, f"{prefix}.quality_output_scale",
              self.quality_output_scale, "positive")
        check(self.retrain_epochs >= 0, f"{prefix}.retrain_epochs", self.retrain_epochs, ">= 0")
        check(self.retrain_lr_scale > 0, f"{prefix}.retrain_lr_scale", self.retrain_lr_scale, "positive")

    def qualities(self, k: int, n_layers: int) -> list[float]:
        """Per-layer quality at iteration k (0-based): hidden layers, then the output layer."""
        q = self.quality + k * self.quality_step
        return [q] * (n_layers - 1) + [q * self.quality_output_scale]


@register_method("han", HanMethodConfig, "Han et al. 2015: iterative |w| < q*std pruning + L2 retraining")
def run_han(ctx, mcfg: HanMethodConfig) -> SparseMLP:
    """Dense training with L2, then ``iterations`` x (threshold pruning, retraining)."""
    model = ctx.train_dense(mcfg.dense_epochs, mcfg.weight_decay)
    stds = [layer_std(layer.weight) for layer in model.layers]  # of the dense net, fixed
    for k in range(mcfg.iterations):
        qs = mcfg.qualities(k, len(model.layers))
        install_masks(model, [han_mask(layer.weight.detach(), layer.mask, q, s)
                              for layer, q, s in zip(model.layers, qs, stds)])
        ctx.log("prune", k + 1, model, quality=qs, thresholds=[q * s for q, s in zip(qs, stds)])
        optimizer = ctx.optimizer(model, mcfg.retrain_lr_scale, mcfg.weight_decay)
        ctx.train(model, mcfg.retrain_epochs, optimizer, lr_scale=mcfg.retrain_lr_scale)
        ctx.log("retrain", k + 1, model)
    ctx.log("final", mcfg.iterations, model)
    return model


# ---- one-shot ------------------------------------------------------------------------
@dataclass
class OneShotMethodConfig:
    """[methods.oneshot]: train dense, prune once to a sparsity by |w|, fine-tune."""

    dense_epochs: int = 20
    sparsity: float = 0.9
    scope: str = "layer"  # layer: every layer at `sparsity`; global: one ranking over all layers
    finetune_epochs: int = 20
    finetune_lr_scale: float = 1.0

    def validate(self, prefix: str) -> None:
        check(self.dense_epochs >= 1, f"{prefix}.dense_epochs", self.dense_epochs, ">= 1")
        check(0 <= self.sparsity < 1, f"{prefix}.sparsity", self.sparsity, "in [0, 1)")
        check(self.scope in ("layer", "global", "lamp"), f"{prefix}.scope", self.scope, "layer, global or lamp")
        check(self.finetune_epochs >= 0, f"{prefix}.finetune_epochs", self.finetune_epochs, ">= 0")
        check(self.finetune_lr_scale > 0, f"{prefix}.finetune_lr_scale", self.finetune_lr_scale, "positive")


def oneshot_masks(model: SparseMLP, sparsity: float, scope: str) -> list[torch.Tensor]:
    """Masks keeping the largest ``|w|`` at ``sparsity``, per layer or over the whole net
    (``global``: raw |w|; ``lamp``: LAMP scores, |w| normalized within each layer)."""
    if scope == "layer":
        return layer_masks(model, sparsity)
    total = sum(layer.mask.numel() for layer in model.layers)
    scores = magnitudes(model) if scope == "global" else [lamp_scores(s) for s in magnitudes(model)]
    return keep_top_masks(scores, [layer.mask for layer in model.layers], keep_count(total, sparsity))


@register_method("oneshot", OneShotMethodConfig, "train dense, prune once by |w| to a sparsity, fine-tune")
def run_oneshot(ctx, mcfg: OneShotMethodConfig) -> SparseMLP:
    """Dense training, one magnitude pruning step, fine-tuning."""
    model = ctx.train_dense(mcfg.dense_epochs)
    install_masks(model, oneshot_masks(model, mcfg.sparsity, mcfg.scope))
    ctx.log("prune", 1, model)
    ctx.train(model, mcfg.finetune_epochs, lr_scale=mcfg.finetune_lr_scale)
    ctx.log("final", 1, model)
    return model


# ---- gradual (Zhu & Gupta) ----------------------------------------------------------------
@dataclass
class GradualMethodConfig:
    """[methods.gradual]: cubic sparsity schedule applied every `frequency` steps."""

    epochs: int = 40  # of the pruning phase (the schedule plus the training after it)
    dense_epochs: int = 0  # 0: prune from scratch (mask of ones at initialization)
    begin_epoch: int = 2
    end_epoch: int = 30
    frequency: int = 100  # optimizer steps between pruning events (Zhu & Gupta's delta t)
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    scope: str = "layer"  # layer: s(t) in every layer (Zhu & Gupta); global: one |w| ranking; lamp: one LAMP ranking

    def validate(self, prefix: str) -> None:
        check(self.scope in ("layer", "global", "lamp"), f"{prefix}.scope", self.scope, "layer, global or lamp")
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, ">= 1")
        check(self.dense_epochs >= 0, f"{prefix}.dense_epochs", self.dense_epochs, ">= 0")
        check(self.begin_epoch >= 0, f"{prefix}.begin_epoch", self.begin_epoch, ">= 0")
        check(self.begin_epoch < self.end_epoch <= self.epochs, f"{prefix}.end_epoch", self.end_epoch,
              f"in ({self.begin_epoch}, {self.epochs}] (after begin_epoch, within epochs)")
        check(self.frequency >= 1, f"{prefix}.frequency", self.frequency, ">= 1")
        check(0 <= self.final_sparsity < 1, f"{prefix}.final_sparsity", self.final_sparsity, "in [0, 1)")
        check(0 <= self.initial_sparsity <= self.final_sparsity, f"{prefix}.initial_sparsity",
              self.initial_sparsity, f"in [0, final_sparsity = {self.final_sparsity}]")


class GradualPruner:
    """Applies Zhu & Gupta's schedule as an ``after_step`` hook of ``ctx.train``.

    Args:
        model: the model being trained.
        optimizer: its optimizer (state at pruned positions is zeroed).
        begin, end: first and last pruning step, in optimizer steps.
        frequency, initial, final: see :func:`gradual_sparsity`.
    """

    def __init__(self, model: SparseMLP, optimizer, begin: int, end: int, frequency: int,
                 initial: float, final: float, scope: str = "layer"):
        self.model, self.optimizer, self.scope = model, optimizer, scope
        self.begin, self.end, self.frequency = begin, end, frequency
        self.initial, self.final = initial, final
        self.step_count = 0
        self.sparsity = 0.0  # the last target applied

    def prune_to(self, sparsity: float) -> None:
        """Keep the largest live |w| at ``sparsity``, per layer or globally (no revival)."""
        install_masks(self.model, oneshot_masks(self.model, sparsity, self.scope), self.optimizer)
        self.sparsity = sparsity

    def update(self) -> None:
        """Prune if the current step is on the schedule."""
        s = gradual_sparsity(self.step_count, self.begin, self.end, self.frequency, self.initial, self.final)
        if s is not None:
            self.prune_to(s)

    def __call__(self) -> None:
        """After an optimizer step: count it, then prune if it is a pruning step."""
        self.step_count += 1
        self.update()


@register_method("gradual", GradualMethodConfig, "Zhu & Gupta 2017: cubic gradual magnitude pruning")
def run_gradual(ctx, mcfg: GradualMethodConfig) -> SparseMLP:
    """Train ``epochs`` while the cubic schedule prunes each layer by |w|."""
    model = ctx.train_dense(mcfg.dense_epochs)
    optimizer = ctx.optimizer(model)
    per_epoch = steps_per_epoch(ctx)
    pruner = GradualPruner(model, optimizer, mcfg.begin_epoch * per_epoch, mcfg.end_epoch * per_epoch,
                           mcfg.frequency, mcfg.initial_sparsity, mcfg.final_sparsity, mcfg.scope)
    pruner.update()  # step 0 is a pruning step when begin_epoch = 0

    def on_epoch(e: int) -> None:
        phase = "prune" if e < mcfg.end_epoch else "retrain"
        ctx.log(phase, e + 1, model, sparsity=pruner.sparsity)

    ctx.train(model, mcfg.epochs, optimizer, after_step=pruner, on_epoch=on_epoch)
    if pruner.sparsity != mcfg.final_sparsity:  # unreachable while end_epoch <= epochs
        raise NestError(f"gradual pruning stopped at sparsity {pruner.sparsity}, before the end of its schedule.")
    ctx.log("final", mcfg.epochs, model)
    return model


# ---- lottery ticket (Frankle & Carbin) ------------------------------------------------------
@dataclass
class LotteryMethodConfig:
    """[methods.lottery]: iterative magnitude pruning with reset to initialization (or rewinding)."""

    epochs_per_round: int = 10
    rounds: int = 5
    rate: float = 0.2  # share of each hidden layer's live weights pruned per round
    output_rate: float = 0.1  # the output layer's share (Frankle & Carbin: half the rate)
    rewind_steps: int = 0  # 0: reset to initialization; k > 0: to the weights after k steps

    def validate(self, prefix: str) -> None:
        check(self.epochs_per_round >= 1, f"{prefix}.epochs_per_round", self.epochs_per_round, ">= 1")
        check(self.rounds >= 1, f"{prefix}.rounds", self.rounds, ">= 1")
        check(0 < self.rate < 1, f"{prefix}.rate", self.rate, "in (0, 1)")
        check(0 <= self.output_rate < 1, f"{prefix}.output_rate", self.output_rate, "in [0, 1)")
        check(self.rewind_steps >= 0, f"{prefix}.rewind_steps", self.rewind_steps, ">= 0")


def lottery_prune_reset(model: SparseMLP, state: dict[str, torch.Tensor], rate: float,
                        output_rate: float) -> list[torch.Tensor]:
    """One lottery-ticket step: prune by |w| at the per-layer rates, then reset to ``state``.

    Args:
        model: the trained model of this round (modified in place).
        state: the parameters to reset to (:func:`snapshot` at init or at the rewind step).
        rate: share of each hidden layer's live weights removed.
        output_rate: share of the output layer's live weights removed.

    Returns:
        The new masks (installed).
    """
    rates = [rate] * (len(model.layers) - 1) + [output_rate]
    masks = [prune_rate_mask(s, layer.mask, r) for s, layer, r in zip(magnitudes(model), model.layers, rates)]
    reset_to(model, state, masks)
    return masks


class _Rewind:
    """after_step hook that snapshots the model after ``steps`` optimizer steps."""

    def __init__(self, model: SparseMLP, steps: int):
        self.model, self.steps, self.count, self.state = model, steps, 0, None

    def __call__(self) -> None:
        self.count += 1
        if self.count == self.steps:
            self.state = snapshot(self.model)


@register_method("lottery", LotteryMethodConfig, "Frankle & Carbin 2019: iterative magnitude pruning with reset")
def run_lottery(ctx, mcfg: LotteryMethodConfig) -> SparseMLP:
    """``rounds`` x (train, prune, reset), then train the last ticket."""
    if mcfg.rewind_steps > steps_per_epoch(ctx) * mcfg.epochs_per_round:
        raise NestError(f"methods.lottery.rewind_steps = {mcfg.rewind_steps} is out of range; it must be at most "
                        f"the first round's {steps_per_epoch(ctx) * mcfg.epochs_per_round} optimizer steps.")
    model = ctx.dense_model()
    state = snapshot(model)  # theta_0
    rewind = _Rewind(model, mcfg.rewind_steps) if mcfg.rewind_steps > 0 else None
    for r in range(1, mcfg.rounds + 1):
        ctx.train(model, mcfg.epochs_per_round, after_step=rewind if r == 1 else None)  # fresh optimizer
        if r == 1:
            ctx.record_dense(model)
            state = rewind.state if rewind is not None else state
        ctx.log("train", r, model)
        lottery_prune_reset(model, state, mcfg.rate, mcfg.output_rate)
        ctx.log("prune", r, model)
    ctx.train(model, mcfg.epochs_per_round)
    ctx.log("final", mcfg.rounds + 1, model)
    return model
