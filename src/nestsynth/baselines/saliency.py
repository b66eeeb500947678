"""Pruning at initialization by a saliency score: SNIP and GraSP (seed 003).

Both methods score every weight of a freshly initialized network on a few
minibatches of training data, keep a fixed fraction of the weights globally (over
all layers at once), and then train the sparse network with the mask fixed
(seed 003, "Algorithms for pruning before training": select a minibatch, compute a
selection function S(theta_0), threshold it at a percentile, train f_{m*theta}).

Definition followed:

* ``snip`` -- SNIP (Lee et al., 2019, "Single-shot network pruning based on
  connection sensitivity").  With a multiplicative mask ``c`` on the weights, the
  connection sensitivity of weight j is the magnitude of the loss derivative with
  respect to its mask entry at c = 1::

      g_j = dL(c * theta; D) / dc_j |_{c=1} = theta_j * dL/dtheta_j
      s_j = |g_j| / sum_k |g_k|

  (the seed writes the same quantity as the limit of a finite difference).  The
  ``kappa = round(total * (1 - sparsity))`` weights with the LARGEST ``s_j`` are kept.
  L is the training loss (mean cross entropy) on the scoring batch.

* ``grasp`` -- GraSP (Wang et al., 2020, "Picking winning tickets before training
  by preserving gradient flow").  The gradient flow is ``Delta L = g^T g`` with
  ``g = dL/dtheta``; removing the perturbation ``delta`` changes it by
  ``2 delta^T H g`` (H the Hessian of L).  The score of weight j is the effect of
  removing it, ``delta = -theta``::

      S(-theta) = -theta ⊙ (H g)

  ``Hg`` is a Hessian-vector product by double backpropagation:
  ``z = stopgrad(g)^T g(theta)``, ``Hg = dz/dtheta``.  Sign convention: a large
  positive score means that removing the weight *increases* the gradient norm
  (or decreases it least), so GraSP REMOVES the weights with the HIGHEST scores and
  keeps the ``round(total * (1 - sparsity))`` LOWEST ones.  This is the seed's and the
  paper's Algorithm 1 (``m = S(-theta_0) < tau``) and the official code
  (``keep = score <= threshold`` of the top-p scores).  As in the paper's code the
  logits are divided by a temperature ``T`` (default 200) for both g and Hg, and the
  scores are normalised by ``|sum_j S_j|`` (a positive factor: the ranking is
  unchanged).

Common to both: only the weight matrices are scored and pruned (biases and batch
norm parameters are never pruned, and for GraSP g and H are taken with respect to
the weights only, the biases held fixed, as in the official code, which collects the
Conv/Linear weights only).  The scores are computed on ``score_batches`` minibatches
of ``batch_size`` training examples drawn without replacement from ``ctx.generator``;
the loss is the mean over all of them (g is the mean of the minibatch gradients and
Hg the mean of the minibatch Hessians times that g), so the minibatches only bound
the memory of the double backward pass (the GraSP code does the same with two
half-batches).  The model is scored in training mode (batch statistics, as in the
original code) and its batch-norm running statistics are restored afterwards.
After the mask is installed the network trains ``epochs`` epochs with ``cfg.train``;
masked weights stay exactly zero (their gradient is zero through ``W * M``).

CNN references (``SparseCNN``): the scores are autograd quantities of any layer, so
conv kernels (out, in, k, k) are scored like linear weights and the global top-k runs
over all flattened weights of all layers together (``kept = round(total * (1 - s))``
with ``total`` counting conv and linear weights).  Graph references (``SparseGraph``) are
scored the same way through their own forward (residual adds and concatenations included).

Deviations: the initialization is the harness's (PyTorch's default uniform, from
``ctx.generator``), not the variance-scaling init of the SNIP paper, so every method
starts from the same network.  The scoring batch is a uniform random sample of
``batch_size * score_batches`` examples rather than GraSP's class-balanced
10 examples per class (default 500 examples, one minibatch, for both methods:
a larger sample only lowers the variance of the scores).  Ties in the scores are
broken by position (layer order, then row-major), earlier first; a NaN score is
ranked last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check
from ..distributed import current
from ..select import keep_top_masks
from ..sparse import set_mask
from .registry import register_method


# ---- configs -------------------------------------------------------------------
@dataclass
class SnipConfig:
    """``[methods.snip]``: SNIP pruning at initialization, then training."""

    sparsity: float = 0.9  # fraction of the weights removed (exact: round(total*(1-s)) kept)
    batch_size: int = 500  # examples per scoring minibatch
    score_batches: int = 1  # scoring minibatches (their losses are averaged)
    epochs: int = 30  # training epochs of the pruned network

    def validate(self, prefix: str) -> None:
        """Range-check every field (``NestError`` on the first failure)."""
        check(0 <= self.sparsity < 1, f"{prefix}.sparsity", self.sparsity, "in [0, 1)")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, ">= 1")
        check(self.score_batches >= 1, f"{prefix}.score_batches", self.score_batches, ">= 1")
        check(self.epochs >= 0, f"{prefix}.epochs", self.epochs, ">= 0")


@dataclass
class GraspConfig(SnipConfig):
    """``[methods.grasp]``: GraSP pruning at initialization, then training."""

    temperature: float = 200.0  # logits are divided by T for the scores (GraSP's code: T = 200)

    def validate(self, prefix: str) -> None:
        """Range-check every field (``NestError`` on the first failure)."""
        super().validate(prefix)
        check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "positive")


# ---- scores (pure functions of a model and a batch) -------------------------------
def _weights(model) -> list[torch.Tensor]:
    return [layer.weight for layer in model.layers]


def _chunks(X: torch.Tensor, y: torch.Tensor, chunk: int):
    """Yield (X_c, y_c, n_c / N): minibatches whose weighted mean loss is the full mean
    (under torchrun: of this rank's part of (X, y), weighted by the whole N, so the sum
    over ranks of what the caller accumulates is the full mean)."""
    n = len(X)
    X, y = current().shard(X, y)
    step = max(len(X), 1) if chunk <= 0 else chunk
    for start in range(0, len(X), step):
        xc, yc = X[start:start + step], y[start:start + step]
        yield xc, yc, len(xc) / n


def _loss(model, X: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross entropy of the logits divided by ``temperature``."""
    return F.cross_entropy(model(X) / temperature, y)


def _grad(outputs: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False):
    """d outputs / d weights with zeros for weights that do not reach the output."""
    if not outputs.requires_grad:
        return [torch.zeros_like(w) for w in weights]
    grads = torch.autograd.grad(outputs, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


class _Scoring:
    """Context manager: training mode for the scoring passes, model state restored after.

    Batch norm in training mode updates its running statistics; scoring must not
    change the model, so every buffer is copied back on exit.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        self.model.train()
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(self.buffers[k])
        self.model.train(self.was_training)
        return False


def mean_gradient(model, X: torch.Tensor, y: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 0) -> list[torch.Tensor]:
    """Gradient of the mean loss over (X, y) with respect to every weight matrix.

    Args:
        model: a SparseMLP or SparseCNN.
        X: (N, *input_shape) inputs; y: (N,) class labels.
        temperature: logits are divided by it.
        chunk: minibatch size of the passes (<= 0: one pass); the result is the
            weighted mean of the minibatch gradients, i.e. the full-batch gradient
            (exactly so without batch norm).

    Returns:
        One detached tensor per layer, of its weight shape.
    """
    weights = _weights(model)
    g = [torch.zeros_like(w) for w in weights]
    with _Scoring(model):
        for xc, yc, frac in _chunks(X, y, chunk):
            for acc, gc in zip(g, _grad(_loss(model, xc, yc, temperature), weights)):
                acc.add_(gc.detach(), alpha=frac)
    return current().all_reduce_sum(g)


def hessian_gradient(model, X: torch.Tensor, y: torch.Tensor, temperature: float = 1.0,
                     chunk: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g, H g) of the mean loss with respect to the weight matrices (biases held fixed).

    ``Hg`` is computed by double backpropagation: for each minibatch c,
    ``z_c = stopgrad(g)^T grad L_c(theta)`` and ``H_c g = dz_c / dtheta``; the result is
    the weighted mean of the ``H_c g``.

    Args:
        model: a SparseMLP or SparseCNN.
        X: (N, *input_shape) inputs; y: (N,) class labels.
        temperature: logits are divided by it (GraSP uses T = 200).
        chunk: minibatch size of the passes (<= 0: one pass).

    Returns:
        (g, Hg): two lists with one detached tensor per layer (its weight shape).
    """
    weights = _weights(model)
    g = mean_gradient(model, X, y, temperature, chunk)
    hg = [torch.zeros_like(w) for w in weights]
    with _Scoring(model):
        for xc, yc, frac in _chunks(X, y, chunk):
            gc = _grad(_loss(model, xc, yc, temperature), weights, create_graph=True)
            z = sum((gi * gci).sum() for gi, gci in zip(g, gc))  # g^T grad L_c, g constant
            for acc, h in zip(hg, _grad(z, weights)):
                acc.add_(h.detach(), alpha=frac)
    return g, current().all_reduce_sum(hg)


def _normalise(scores: list[torch.Tensor], denom: torch.Tensor) -> list[torch.Tensor]:
    """Divide every score by ``denom`` unless it is zero (the ranking never changes)."""
    if float(denom) == 0.0 or not torch.isfinite(denom):
        return scores
    return [s / denom for s in scores]


def snip_scores(model, X: torch.Tensor, y: torch.Tensor, chunk: int = 0) -> list[torch.Tensor]:
    """SNIP connection sensitivities ``|theta_j dL/dtheta_j| / sum_k |theta_k dL/dtheta_k|``.

    Equals ``|dL/dc_j|`` at c = 1 for a multiplicative mask c on the weights,
    normalised to sum 1 over all layers.  Dormant weights (mask 0) score 0.

    Args:
        model: a SparseMLP or SparseCNN (not modified).
        X: (N, *input_shape) inputs; y: (N,) labels.
        chunk: minibatch size of the gradient passes (<= 0: one pass).

    Returns:
        One tensor per layer (its weight shape); larger means more important.
    """
    g = mean_gradient(model, X, y, 1.0, chunk)
    raw = [(layer.weight.detach() * layer.mask * gi).abs() for layer, gi in zip(model.layers, g)]
    return _normalise(raw, sum(s.sum() for s in raw))


def grasp_scores(model, X: torch.Tensor, y: torch.Tensor, temperature: float = 200.0,
                 chunk: int = 0) -> list[torch.Tensor]:
    """GraSP scores ``S(-theta) = -theta ⊙ Hg``, normalised by ``|sum_j S_j|``.

    A HIGH score marks a weight whose removal reduces the gradient flow least
    (or increases it): GraSP removes the highest scores (see :func:`~nestsynth.select.keep_top_masks`
    with ``largest=False``).  Dormant weights score 0.

    Args:
        model: a SparseMLP or SparseCNN (not modified).
        X: (N, *input_shape) inputs; y: (N,) labels.
        temperature: logits are divided by it for g and Hg.
        chunk: minibatch size of the passes (<= 0: one pass).

    Returns:
        One tensor per layer (its weight shape).
    """
    _, hg = hessian_gradient(model, X, y, temperature, chunk)
    raw = [-(layer.weight.detach() * layer.mask) * h for layer, h in zip(model.layers, hg)]
    return _normalise(raw, sum(s.sum() for s in raw).abs())


def kept_count(total: int, sparsity: float) -> int:
    """Weights kept at a global ``sparsity``: ``round(total * (1 - sparsity))``."""
    return int(round(total * (1.0 - sparsity)))


# ---- methods ----------------------------------------------------------------------
def _prune_at_init(ctx, mcfg, score: Callable, largest: bool, **log_extra):
    """Score a fresh network, keep the global top weights, train with the mask fixed.

    Args:
        score: ``score(model, X, y, chunk) -> list of per-layer tensors``.
        largest: keep the largest scores (else the smallest).
    """
    model = ctx.dense_model()
    X, y = ctx.batch(mcfg.batch_size * mcfg.score_batches)  # without replacement
    scores = score(model, X, y, mcfg.batch_size)
    total = sum(layer.weight.numel() for layer in model.layers)
    n_keep = kept_count(total, mcfg.sparsity)
    masks = keep_top_masks(scores, [layer.mask for layer in model.layers], n_keep, largest=largest)
    for layer, m in zip(model.layers, masks):
        set_mask(layer, m)
    ctx.log("prune", 0, model, kept=n_keep, total=total, score_examples=len(X), **log_extra)
    if mcfg.epochs > 0:
        ctx.train(model, mcfg.epochs)
    model.zero_dormant()
    ctx.log("final", 1, model)
    return model


@register_method("snip", SnipConfig,
                 "SNIP: keep the top connection sensitivities |theta dL/dtheta| at init, then train")
def run_snip(ctx, mcfg: SnipConfig):
    """SNIP (Lee et al., 2019) on the reference architecture; returns the trained sparse model."""
    return _prune_at_init(ctx, mcfg, lambda m, X, y, c: snip_scores(m, X, y, chunk=c), largest=True)


@register_method("grasp", GraspConfig,
                 "GraSP: remove the weights with the highest -theta*Hg at init (gradient flow), then train")
def run_grasp(ctx, mcfg: GraspConfig):
    """GraSP (Wang et al., 2020) on the reference architecture; returns the trained sparse model."""
    return _prune_at_init(ctx, mcfg,
                          lambda m, X, y, c: grasp_scores(m, X, y, mcfg.temperature, chunk=c),
                          largest=False, temperature=mcfg.temperature)
