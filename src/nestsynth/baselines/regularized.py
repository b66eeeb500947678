"""Regularize-then-prune baselines: L0 hard-concrete gates and sensitivity-driven decay.

Both methods let training decide which weights survive; neither takes a target
sparsity, so the kept count is set by the method's own rule (documented below).

``l0`` -- Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
Regularization" (ICLR 2018); seed 003.

    Definition followed: every weight ``w_j`` gets a gate ``z_j`` drawn from the
    hard concrete distribution with parameter ``log_alpha_j``::

        u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
        s_bar = s * (zeta - gamma) + gamma,   z = min(1, max(0, s_bar))

    with the paper's beta = 2/3, gamma = -0.1, zeta = 1.1.  The network computes
    with ``w * z`` (one fresh noise sample per weight per minibatch, shared by the
    examples of the batch).  The objective is the paper's Eq. 3 with the expected
    L0 norm in closed form, divided by the training-set size N as in the paper's
    "lambda = 0.1/N" and its reference code's ``-(1/N) * regularization()``::

        loss = mean CE + (1/N) * sum_j P(z_j != 0) * (lam + 0.5 * weight_decay * w_j**2)
        P(z_j != 0) = 1 - Q(s_bar_j <= 0) = sigmoid(log_alpha_j - beta * log(-gamma / zeta))

    i.e. ``(lam/N) * sum_j P(z_j != 0)`` plus, only when ``weight_decay > 0``, the
    reference code's gate-weighted L2 term (its ``prior_prec``); the sum runs over
    the weights (biases are neither gated nor penalized).  ``lam = 0.1`` is the
    paper's "lambda = 0.1/N".  ``log_alpha`` starts at ``log(1 - p) - log(p)`` plus
    N(0, 0.01^2) noise, p = ``init_droprate`` (the reference code's ``droprate_init``;
    p = 0.5 gives log_alpha = 0, i.e. P(z != 0) = 0.83 and z_hat = 0.5).  At the end
    the test-time gate ``z_hat = min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``
    is folded in: mask = mask * (z_hat > 0) and weight = weight * z_hat, so the
    returned model equals the deterministic gated network exactly.  The kept count
    is the number of gates with z_hat > 0, i.e. log_alpha > log(-gamma / zeta) = -2.40.

    CNN and graph references: every kernel weight of a conv layer gets its own gate (the
    gates have the (out, in, k, k) kernel shape) and the gated conv layer is computed as
    ``conv2d(x, W * M * z) + b`` (times the area mask, as MaskedConv2d); everything else
    (penalty, folding) is the same per weight.  The gated network is the model's own
    forward with every mask M replaced by M * z, so any structure (residual adds,
    concatenations) is gated alike.

    Deviations: gates are per weight (unstructured), not per input neuron (or, for
    conv layers, per feature map) as in the paper's experiments, because every method
    here is compared by its weight count; the gates of the input layer start at the same drop rate as the
    others (the paper's MLP used 0.2 there, 0.5 elsewhere).  The optimizer is the
    run's ``[train]`` optimizer and schedule (Adam, cosine), with log_alpha in an
    extra parameter group without weight decay.  ``gate_lr_scale`` gives log_alpha
    its own learning rate even though the harness sets one learning rate for every
    group: log_alpha is stored as ``k * theta`` with ``k = gate_lr_scale`` under Adam
    (invariant to gradient scale, so log_alpha moves ``gate_lr_scale`` times as fast)
    and ``k = sqrt(gate_lr_scale)`` under SGD (where the step scales with ``k**2``).
    Defaults ``lam = 0.3`` (three times the paper's 0.1/N) and ``gate_lr_scale = 10``,
    because the paper trains 200 epochs and this budget is 40: a closed gate needs
    log_alpha to fall from 0 to -2.4, which Adam at lr 1e-3 (cosine) cannot do for
    gates that feel any loss gradient within 40 epochs.  Measured on
    LeNet-300-100/MNIST (40 epochs, seed 0, 5k validation images): paper values
    (lam 0.1, scale 1) pruned nothing in 10 epochs; lam 0.1 / 0.3 / 1.0 with scale 10
    kept 47.7k / 19.1k / 6.4k weights (82 / 93 / 98% sparsity; test error 1.58 /
    1.74 / 2.52%, Adam lr 1e-3, no augmentation); the defaults with the repo's
    LeNet config (Adam lr 2e-3, affine augmentation) kept 10.1k (96.2%) at 1.38%
    with lam 0.5, the default until the digits measurement: the penalty is lam/N per gate,
    so a small training set is pruned harder (the prior weighs more against fewer
    examples); on digits' 64-64-32-10 (N = 1,293) lam 0.5 kept 216 weights at 14.2% test
    error, lam 0.3 keeps 601-672 at 3.9-4.7% (seeds 0-1), lam 0.2 about 1.0k at 3.1-3.3%.

``sensitivity`` -- Tartaglione, Lepsoy, Fiandrotti & Francini, "Learning Sparse
Neural Networks via Sensitivity-Driven Regularization" (NeurIPS 2018); seed 003.

    Definition followed: with the network's post-softmax output ``y`` (C classes),
    the sensitivity of a weight is ``S(y, w) = sum_k alpha_k |dy_k / dw|`` and the
    bounded insensitivity ``S_b = max(0, 1 - S)``.  After each gradient step every
    weight is decayed by the insensitivity term of the paper's update rule::

        w <- w - lam * w * max(0, 1 - S(y, w))

    ``variant = "supervised"`` (the paper's specialized S^spec): alpha_k = 1 for
    the example's true class, 0 otherwise, so ``S = |dy_c / dw|``.
    ``variant = "unsupervised"`` (S^unspec): alpha_k = 1/C for every class.
    S is the mean over a minibatch of the per-example sensitivities,
    ``S(w_ij) = (1/B) sum_n sum_k alpha_k |dy_k(x_n) / dw_ij|``, computed exactly:
    for a linear layer ``dy_k(x_n)/dW_ij = delta_k[n, i] * x[n, j]`` (delta = dy_k/du
    at the layer's output u, x its input), so ``|.|`` factorizes and
    ``S = (sum_k alpha_k |delta_k|).T @ |x| / B`` -- one backward pass per
    class that counts (1 supervised, C unsupervised) and one matmul per layer; no
    per-example weight gradients are formed.  After training, weights with
    ``|w| < threshold`` are pruned (mask 0, weight 0); ``final_epochs`` of masked
    retraining follow.  The kept count is whatever the threshold leaves.

    Conv layers (CNN and graph references): a conv weight's derivative sums over the
    output positions t, ``dy_k(x_n)/dW = sum_t delta_k[n, :, t] x_{n,t}^T`` (x_{n,t} the
    input patch of position t, ``F.unfold`` with the layer's stride and padding; delta
    taken at the conv output, i.e. times the area mask, so positions a channel does not
    compute contribute nothing), so ``|.|`` does not factorise: the per-example weight
    gradient is formed exactly, one batched (out, P) @ (P, in*k*k) product per example
    and class that counts, its absolute value summed over the examples (in chunks of
    examples).  Cost per conv layer and class: B * out * P * in*k*k multiply-adds (P
    output positions), about P times the linear formula's, and a transient (chunk, out,
    in*k*k) tensor; the backward passes are the same as for an MLP (measured on LeNet-5,
    64 examples, one thread of a busy machine: 0.10 s per step supervised, 0.48 s
    unsupervised, against 0.05 s for the training step's forward and backward pass).
    Linear layers keep
    the factorised matmul.  Every reference runs: ``model.trace`` gives every weight
    layer's input and output; the class probabilities are the softmax of the network's
    output (a graph network's, which need not be its last layer's; a chain's is its last
    layer's output).

    Deviations: (1) the harness's ``after_step`` sees no batch, so S is estimated on
    a separate random minibatch of ``train.batch_size`` training examples each step,
    and at the weights after the gradient step (a split step: gradient, then decay;
    the paper evaluates both at w^{t-1}, a difference of order lr * lam).  (2) S is
    computed in eval mode, so batch norm (if any) uses its running statistics and
    every example's derivative is its own.  (3) Only the weights of the linear
    and conv layers are decayed and thresholded (biases are never pruned here).  (4) The
    gradient step uses plain SGD with momentum ``train.momentum`` at learning rate
    ``sgd_lr`` (the paper's SGD; cosine-annealed by the harness) unless ``sgd_lr = 0``,
    which uses the run's ``[train]`` optimizer instead.  (5) The paper chooses the
    threshold from validation performance; here it is a fixed hyperparameter.
    (6) The harness anneals the learning rate (cosine down to 1% of it); the paper
    keeps lr and lam constant.  With ``lam_follows_lr`` (default) the decay uses
    ``lam * lr(t) / lr(0)``, so the paper's balance lam / lr between the decay and
    the gradient step holds throughout; with a constant lam the decay overwhelms the
    vanishing gradient steps at the end of the schedule (measured: lam 5e-3
    constant left a network at 88% validation error before thresholding).

    Defaults (lam 1e-2, threshold 0.02, 30 + 10 epochs, SGD lr 0.1): measured on
    LeNet-300-100/MNIST with the repo's LeNet config (seed 0, affine augmentation)
    they keep 22.8k weights (91.4% sparsity) at 1.40% test error (unsupervised
    variant: 23.3k, 1.29%).  Without augmentation, lam 5e-3 and threshold 0.02 kept
    23.8k at 1.56%.  Note that on this network S stays far below 1 (median
    1e-5..1e-2 per layer, maximum 0.06 after 2 epochs), so max(0, 1 - S) is 0.94..1
    and the decay acts almost uniformly: which weights survive is decided by the
    gradient step resisting the decay, as the paper's Holder-bound argument says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check
from ..distributed import current
from ..pruning import gates as G
from ..pruning.gates import BETA, L0Gates, L0SizeControl, initial_log_alpha, keep_most_open, theta_scale
from ..sparse import MaskedConv2d, SparseMLP, set_mask
from .magnitude import steps_per_epoch
from .registry import register_method

# ============================================================================ L0
@dataclass
class L0Config:
    """Hyperparameters of ``l0`` (section ``[methods.l0]``)."""

    lam: float = G.LAM  # penalty per expected non-zero weight, times 1/N (paper: 0.1)
    epochs: int = 40
    init_droprate: float = G.DROPRATE  # initial log_alpha = log(1 - p) - log(p)
    temperature: float = BETA  # beta of the hard concrete distribution
    gate_lr_scale: float = G.LR_SCALE  # learning rate of log_alpha relative to the weights'
    weight_decay: float = 0.0  # gate-weighted L2 (the paper's prior precision); 0 = off
    target_weights: int = 0  # > 0: lam is steered so the test-time gates keep this many weights (see run_l0)
    target_gain: float = G.GAIN  # with target_weights: lam *= exp(gain * clip(expected / goal - 1, -1, 1)) per step
    target_release: float = G.RELEASE  # with target_weights: below the goal lam falls this many times faster (1: symmetric)

    def validate(self, prefix: str) -> None:
        check(self.lam >= 0, f"{prefix}.lam", self.lam, "non-negative")
        check(self.target_weights >= 0, f"{prefix}.target_weights", self.target_weights, ">= 0 (0: lam decides)")
        check(self.target_gain > 0, f"{prefix}.target_gain", self.target_gain, "positive")
        check(self.target_release >= 1, f"{prefix}.target_release", self.target_release, ">= 1")
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, ">= 1")
        check(0 < self.init_droprate < 1, f"{prefix}.init_droprate", self.init_droprate, "in (0, 1)")
        check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "positive")
        check(self.gate_lr_scale > 0, f"{prefix}.gate_lr_scale", self.gate_lr_scale, "positive")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "non-negative")


def _l0_optimizer(ctx, gates: L0Gates):
    """``[train]``'s optimizer for the network, plus log_alpha's group without weight decay."""
    opt = ctx.optimizer(gates.model)
    opt.add_param_group({"params": list(gates.theta), "weight_decay": 0.0})
    return opt


CALIBRATION_SAMPLES = 10000  # training inputs that recompute batch-norm statistics for the test-time gates


@register_method("l0", L0Config, "L0 regularization with hard concrete gates per weight (Louizos et al., 2018)")
def run_l0(ctx, mcfg: L0Config) -> SparseMLP:
    """Train a gated network with the expected-L0 penalty, then fold the test-time gates in.

    With ``target_weights`` lam follows :class:`L0SizeControl` for all but the last tenth
    of the epochs (at least one); then exactly ``target_weights`` weights are kept, those
    with the largest log_alpha (the most open gates; a weight whose test-time gate is
    closed keeps its ungated value), and the network is fine-tuned with that mask for
    the remaining epochs.  (Deviation, for equal-size comparisons: Louizos et al. take
    the size lam gives.)

    On a network with batch norm the running statistics, gathered under noisy gates, are
    recomputed for the test-time gates (``ctx.calibrated`` on the first
    ``CALIBRATION_SAMPLES`` training inputs) for every logged row and for the
    folded network.

    Returns:
        The model with mask = (z_hat > 0) and weights w * z_hat.
    """
    model = ctx.dense_model()
    init = initial_log_alpha(model, mcfg.init_droprate, ctx.generator)
    scale = theta_scale(mcfg.gate_lr_scale, ctx.cfg.train.optimizer)
    gates = L0Gates(model, init, mcfg.temperature, scale, ctx.generator).to(ctx.device)
    n_train = len(ctx.X)
    control, gated_epochs = None, mcfg.epochs
    if mcfg.target_weights > 0:
        gated_epochs = mcfg.epochs - max(1, round(mcfg.epochs / 10)) if mcfg.epochs > 1 else mcfg.epochs
        control = L0SizeControl(gates, mcfg.lam, mcfg.target_weights, gated_epochs * steps_per_epoch(ctx),
                                mcfg.target_gain, release=mcfg.target_release)

    def penalty() -> torch.Tensor:
        return gates.penalty(control.lam if control else mcfg.lam, n_train, mcfg.weight_decay)

    def on_epoch(e: int) -> None:
        extra = {"lam": control.lam, "goal": control.goal(control.step)} if control else {}
        view = ctx.calibrated(gates.deterministic_model(), CALIBRATION_SAMPLES)
        ctx.log("l0", e + 1, view, expected_l0=float(gates.expected_l0().detach()), **extra)

    ctx.train(gates, gated_epochs, _l0_optimizer(ctx, gates), penalty=penalty, on_epoch=on_epoch,
              after_step=control)
    if control is None:
        ctx.calibrated(gates.fold_into(model), CALIBRATION_SAMPLES)
    else:
        keep_most_open(gates, mcfg.target_weights)
        ctx.log("project", gated_epochs, ctx.calibrated(model, CALIBRATION_SAMPLES))
        ctx.train(model, mcfg.epochs - gated_epochs)
    ctx.log("final", mcfg.epochs, model)
    return model


# ==================================================================== sensitivity
VARIANTS = ("supervised", "unsupervised")


@dataclass
class SensitivityConfig:
    """Hyperparameters of ``sensitivity`` (section ``[methods.sensitivity]``)."""

    lam: float = 1e-2  # decay per step of a fully insensitive weight (at the initial lr)
    epochs: int = 30
    threshold: float = 0.02  # after training, |w| < threshold is pruned
    final_epochs: int = 10  # masked retraining after thresholding (0 = none)
    variant: str = "supervised"  # supervised: S = |dy_c/dw|; unsupervised: mean_k |dy_k/dw|
    sgd_lr: float = 0.1  # SGD (momentum train.momentum) learning rate; 0 = the [train] optimizer
    lam_follows_lr: bool = True  # scale lam by lr(t) / lr(0), keeping the paper's lam / lr ratio

    def validate(self, prefix: str) -> None:
        check(0 <= self.lam < 1, f"{prefix}.lam", self.lam, "in [0, 1)")
        check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, ">= 1")
        check(self.threshold >= 0, f"{prefix}.threshold", self.threshold, "non-negative")
        check(self.final_epochs >= 0, f"{prefix}.final_epochs", self.final_epochs, ">= 0")
        check(self.variant in VARIANTS, f"{prefix}.variant", self.variant, " or ".join(VARIANTS))
        check(self.sgd_lr >= 0, f"{prefix}.sgd_lr", self.sgd_lr, "non-negative (0 = the [train] optimizer)")


def sensitivity(model: SparseMLP, X: torch.Tensor, y: torch.Tensor,
                variant: str = "supervised") -> list[torch.Tensor]:
    """Per-weight sensitivity of the softmax output, averaged over the examples.

    ``S(w_ij) = (1/B) sum_n sum_k alpha_k |dy_k(x_n) / dw_ij|`` with alpha = one-hot of
    ``y_n`` (supervised) or 1/C (unsupervised); computed in eval mode.  Linear layers:
    the factorised ``|delta| |x|`` matmul; conv layers: exact per-example gradients
    (:func:`conv_abs_grad_sum`).

    Args:
        model: the network (its weights are not changed): an MLP, CNN or graph network.
        X: (B, features) examples; y: (B,) their labels (used by "supervised").
        variant: "supervised" or "unsupervised".

    Returns:
        One tensor per layer, of its weight's shape ((out_i, in_i) for a linear layer),
        zero at masked positions.
    """
    was_training = model.training
    model.eval()
    n = len(X)
    X, y = current().shard(X, y)  # under torchrun: this rank's examples, the sums summed across ranks
    layers = list(model.layers)
    conv = [isinstance(layer, MaskedConv2d) for layer in layers]
    try:
        with torch.enable_grad():
            inputs, outputs, logits = _trace_with_output(model, X)  # inputs[i]: (B, in_i), outputs[i]: (B, out_i)
            probs = torch.softmax(logits, dim=1)  # (B, C)
            if variant == "supervised":
                targets, alpha = [probs.gather(1, y.view(-1, 1)).sum()], 1.0
            else:
                targets, alpha = [probs[:, k].sum() for k in range(probs.shape[1])], 1.0 / probs.shape[1]
            # linear: sum_k alpha_k |delta_k|, (B, out_i); conv: sum_n sum_k alpha_k |dy_k(x_n)/dW|
            acc = [torch.zeros_like(layer.weight) if c else torch.zeros_like(u)
                   for layer, c, u in zip(layers, conv, outputs)]
            for k, target in enumerate(targets):
                deltas = torch.autograd.grad(target, outputs, retain_graph=k + 1 < len(targets))
                for a, d, layer, x, c in zip(acc, deltas, layers, inputs, conv):
                    if c:
                        a.add_(conv_abs_grad_sum(layer, x.detach(), d), alpha=alpha)
                    else:
                        a.add_(d.abs(), alpha=alpha)
    finally:
        model.train(was_training)
    # |delta[n,i] * x[n,j]| = |delta[n,i]| * |x[n,j]|, so the mean over n is one matmul
    sums = current().all_reduce_sum([a if c else a.T @ x.detach().abs() for a, x, c in zip(acc, inputs, conv)])
    return [s / n * layer.mask for s, layer in zip(sums, layers)]


def _trace_with_output(model, X: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``model.trace(X)`` and the network's output: a graph network's forward (which its
    trace runs) is caught by a hook; a chain's trace does not call its forward, and its
    output is its last layer's."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        inputs, outputs = model.trace(X)
    finally:
        handle.remove()
    return inputs, outputs, seen[-1] if seen else outputs[-1]


CONV_CHUNK = 1 << 22  # entries of the per-example gradients formed at once by conv_abs_grad_sum


def conv_abs_grad_sum(layer: MaskedConv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``sum_n |dy(x_n)/dW|`` of one scalar per example for a conv layer, exactly.

    Args:
        layer: the MaskedConv2d (stride, padding, area mask).
        x: (B, C, H, W) its inputs.
        delta: (B, out, H', W') ``dy(x_n)/du`` at its output u = (conv + b) * area.

    Returns:
        (out, C, k, k): the absolute per-example weight gradients
        ``sum_t delta[n, :, t] x_{n,t}^T`` (times the area), summed over the examples.
    """
    d = delta * layer.area if not bool(layer.area.all()) else delta
    d = d.flatten(2)  # (B, out, P)
    out, D = layer.weight.shape[0], layer.weight[0].numel()
    total = torch.zeros(out, D, dtype=delta.dtype, device=delta.device)
    step = max(1, CONV_CHUNK // max(1, out * D + d.shape[2] * D))
    for start in range(0, len(x), step):
        cols = torch.nn.functional.unfold(x[start:start + step], layer.kernel_size, padding=layer.padding,
                                          stride=layer.stride)  # (b, D, P)
        total += torch.bmm(d[start:start + step], cols.transpose(1, 2)).abs().sum(0)  # per example (out, D)
    return total.view_as(layer.weight)


@torch.no_grad()
def insensitivity_decay(model: SparseMLP, sens: list[torch.Tensor], lam: float) -> None:
    """The regularization part of the update: ``w <- w - lam * w * max(0, 1 - S)`` (in place).

    Args:
        model: the network.
        sens: per-layer sensitivities from :func:`sensitivity`.
        lam: the regularization factor.
    """
    for layer, s in zip(model.layers, sens):
        layer.weight.sub_(lam * layer.weight * (1.0 - s).clamp(min=0.0))


@torch.no_grad()
def threshold_prune(model: SparseMLP, threshold: float, optimizer=None) -> int:
    """Prune every active weight with ``|w| < threshold``.

    Args:
        model: the network (masks installed in place, pruned weights set to zero).
        threshold: T.
        optimizer: its state at the pruned positions is zeroed.

    Returns:
        The number of connections pruned.
    """
    removed = 0
    for layer in model.layers:
        keep = (layer.weight.abs() >= threshold).to(layer.mask.dtype) * layer.mask
        removed += int(layer.mask.sum() - keep.sum())
        set_mask(layer, keep, optimizer)
    return removed


def _sensitivity_optimizer(ctx, model, mcfg: SensitivityConfig):
    """(optimizer, lr_scale): the paper's SGD at ``sgd_lr``, or ``[train]``'s optimizer."""
    t = ctx.cfg.train
    if mcfg.sgd_lr == 0:
        return ctx.optimizer(model), 1.0
    opt = torch.optim.SGD(model.parameters(), lr=mcfg.sgd_lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return opt, mcfg.sgd_lr / t.lr  # ctx.train sets lr = train.lr * lr_scale


@register_method("sensitivity", SensitivityConfig,
                 "sensitivity-driven regularization, then thresholding (Tartaglione et al., 2018)")
def run_sensitivity(ctx, mcfg: SensitivityConfig) -> SparseMLP:
    """Train with the insensitivity decay after every step, threshold, retrain.

    Returns:
        The thresholded (and retrained) model.
    """
    model = ctx.dense_model()
    opt, lr_scale = _sensitivity_optimizer(ctx, model, mcfg)
    batch, lr0 = ctx.cfg.train.batch_size, ctx.cfg.train.lr * lr_scale

    def after_step() -> None:
        lam = mcfg.lam * (opt.param_groups[0]["lr"] / lr0 if mcfg.lam_follows_lr else 1.0)
        X, y = ctx.batch(batch)
        insensitivity_decay(model, sensitivity(model, X, y, mcfg.variant), lam)

    def on_epoch(e: int) -> None:
        below = sum(int(((layer.weight.abs() < mcfg.threshold) & (layer.mask > 0)).sum()) for layer in model.layers)
        ctx.log("regularize", e + 1, model, below_threshold=below)

    ctx.train(model, mcfg.epochs, opt, lr_scale=lr_scale, after_step=after_step, on_epoch=on_epoch)
    removed = threshold_prune(model, mcfg.threshold, opt)
    ctx.log("threshold", mcfg.epochs + 1, model, pruned=removed)
    if mcfg.final_epochs > 0:
        ctx.train(model, mcfg.final_epochs, opt, lr_scale=lr_scale)
    ctx.log("final", mcfg.epochs + 1 + (mcfg.final_epochs > 0), model)
    return model
