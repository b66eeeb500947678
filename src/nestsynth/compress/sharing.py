"""Weight sharing by k-means and retraining of the shared centroids (Deep Compression, stage 2).

Definition followed (Han, Mao, Dally, "Deep Compression", ICLR 2016, §3):

* Per layer (weights are not shared across layers), the active weights are
  partitioned into ``k = 2**bits`` clusters minimising the within-cluster sum of
  squares, ``argmin_C sum_k sum_{w in c_k} |w - c_k|^2``.  Active = mask 1 and
  non-zero; pruned and zero weights stay exactly zero and are not clustered.
* Centroid initialisation: *linear* -- ``k`` centroids equally spaced between the
  smallest and the largest active weight (the paper's best choice, Fig. 4-5).
* Lloyd iterations (assign every weight to its nearest centroid, ties to the
  smaller centroid; move each centroid to the mean of its weights) until no
  assignment changes, at most ``max_iter`` times.  An empty cluster keeps its
  centroid during the iterations; clusters still empty at the end are dropped, so
  a layer's codebook has at most ``2**bits`` entries (sorted ascending).
* Layers with at most ``k`` distinct active values: the centroids are exactly those
  distinct values (sharing is lossless); a layer without active weights gets an
  empty codebook.
* Conv layers (SparseCNN, or the conv layers of a SparseGraph): a kernel (out, in, k, k)
  is shared as the (out, in*k*k) matrix of its flattened kernels (row-major positions are
  the same), one codebook per layer as for linear layers.  A graph network (SparseGraph:
  residual, concatenated) is shared layer by layer over its ``layers`` (graph order) as
  a chain is.  Deep Compression uses 8 bits for conv layers and
  5 for fc layers (§3.1); ``conv_bits`` sets the conv layers' bits (default ``bits``).
* Fine-tuning (§3.3): the weight matrix is always ``W_ij = C[I_ij]``; the gradient
  of a centroid is the sum of the gradients of the weights of its cluster,
  ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)``, obtained here by autograd through the
  gather ``C[I]``; only the centroids are trained.

Deviations / choices: the centroid update uses Adam (nestsynth's training default)
rather than plain SGD, because the summed gradient of a cluster scales with its
size and Adam normalises that per centroid.  During fine-tuning the model runs in
eval mode (batch norm uses and keeps its running statistics: only centroids
change), biases are frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..sparse import MaskedConv2d, SparseCNN, SparseMLP
from ..training import cosine_lr, train_epoch


@dataclass
class SharedLayer:
    """The shared form of one layer.

    Attributes:
        centroids: (k,) float32 codebook, ascending, ``k <= 2**bits``.
        index: (n,) int64 cluster of each active weight, in the order of ``positions``.
        positions: (n,) int64 row-major flat positions of the active weights in the
            weight tensor, ascending (for a conv kernel (out, in, k, k) these are also the
            positions in its (out, in*k*k) matrix, see :attr:`matrix_shape`).
        shape: the weight's shape, (out, in) or (out, in, k, k).
    """

    centroids: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    shape: tuple[int, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of a linear layer, (out, in*k*k) of a conv layer: the matrix stored."""
        return self.shape[0], math.prod(self.shape[1:])

    def weight(self, centroids: torch.Tensor | None = None) -> torch.Tensor:
        """The weight tensor ``C[I]`` (of :attr:`shape`) at the active positions, zero elsewhere.

        Args:
            centroids: (k,) codebook to use instead of ``self.centroids`` (gradients
                flow back to it: the backward of the gather sums each cluster's gradients).
        """
        c = self.centroids if centroids is None else centroids
        w = torch.zeros(math.prod(self.shape), dtype=c.dtype, device=c.device)
        w = w.index_put((self.positions.to(c.device),), c[self.index.to(c.device)])
        return w.view(self.shape)


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every value (ties to the smaller centroid).

    Args:
        values: (n,) values.
        centroids: (k,) centroids in ascending order.

    Returns:
        (n,) int64 indices into ``centroids``.
    """
    mids = (centroids[1:] + centroids[:-1]) / 2  # (k-1,) decision boundaries
    return torch.bucketize(values, mids, right=False)


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's k-means on scalars with linear initialisation between min and max.

    Args:
        values: (n,) values to cluster.
        k: number of clusters (at least 1).
        max_iter: cap on the Lloyd iterations.

    Returns:
        (centroids, index, iterations): non-empty clusters' centroids (float64,
        ascending), the (n,) cluster index of every value, and the number of Lloyd
        iterations run.  With at most ``k`` distinct values the centroids are those
        values.
    """
    x = values.detach().double().flatten()
    distinct = torch.unique(x)  # sorted
    if len(distinct) <= k:
        return distinct, torch.searchsorted(distinct, x), 0
    c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    idx = assign(x, c)
    it = 0
    for it in range(1, max_iter + 1):
        counts = torch.bincount(idx, minlength=k).double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty cluster keeps its centroid
        c, _ = torch.sort(c)
        new = assign(x, c)
        if torch.equal(new, idx):
            break
        idx = new
    used = torch.unique(idx)  # drop empty clusters, re-number the rest
    return c[used], torch.searchsorted(used, idx), it


def share_weights(model: SparseMLP | SparseCNN, bits: int = 5, max_iter: int = 300,
                  conv_bits: int | None = None) -> list[SharedLayer]:
    """k-means weight sharing of every layer's active weights with ``2**bits`` clusters.

    Args:
        model: the sparse model (not modified; see :func:`apply_sharing`).
        bits: bits per weight index; ``2**bits`` clusters per layer.
        max_iter: cap on the Lloyd iterations per layer.
        conv_bits: bits of the conv layers (None: ``bits``; Deep Compression uses 8).

    Returns:
        One :class:`SharedLayer` per weight layer (linear or conv).
    """
    shared = []
    for layer in model.layers:
        b = conv_bits if (conv_bits is not None and isinstance(layer, MaskedConv2d)) else bits
        w = (layer.weight.detach() * layer.mask).cpu()  # (out, in) or (out, in, k, k)
        positions = torch.nonzero(w.flatten() != 0).flatten()  # row-major, ascending
        centroids, index, _ = kmeans_1d(w.flatten()[positions], 2 ** b, max_iter)
        shared.append(SharedLayer(centroids.float(), index, positions, tuple(w.shape)))
    return shared


@torch.no_grad()
def apply_sharing(model: SparseMLP | SparseCNN, shared: list[SharedLayer]) -> None:
    """Write ``C[I]`` into every layer's weight (zero off the active positions); masks unchanged."""
    for layer, s in zip(model.layers, shared):
        layer.weight.copy_(s.weight().to(layer.weight))


class CentroidModel(nn.Module):
    """The model as a function of its centroids only: ``W_i = C_i[I_i]``, everything else frozen.

    ``centroids[i]`` is the trainable codebook of layer i; the wrapped model's own
    parameters are passed detached, so a backward pass reaches only the centroids.

    Args:
        model: the SparseMLP, SparseCNN or SparseGraph (kept as a plain reference, not a
            submodule).
        shared: its shared form (indices and positions are fixed).
    """

    def __init__(self, model: SparseMLP | SparseCNN, shared: list[SharedLayer]):
        super().__init__()
        dev = model.layers[0].weight.device
        self.centroids = nn.ParameterList(nn.Parameter(s.centroids.clone().to(dev)) for s in shared)
        self.shared = shared
        self.frozen = [model]  # a list, not a submodule: its parameters are not trained
        # each layer's weight by its name in the model's parameters (``layers.i.weight`` for a
        # chain, the module path inside ``net`` for a graph network)
        names = {id(p): name for name, p in model.named_parameters()}
        self.weight_names = [names[id(layer.weight)] for layer in model.layers]

    def weights(self) -> dict[str, torch.Tensor]:
        """Parameter overrides for ``functional_call``: every layer's ``C[I]``, the rest detached."""
        model = self.frozen[0]
        params = {name: p.detach() for name, p in model.named_parameters()}
        for name, c, s in zip(self.weight_names, self.centroids, self.shared):
            params[name] = s.weight(c)
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, *input) -> (B, classes)
        return functional_call(self.frozen[0], self.weights(), (x,))


def finetune_centroids(model: SparseMLP | SparseCNN, shared: list[SharedLayer], X: torch.Tensor, y: torch.Tensor,
                       epochs: int, lr: float, batch_size: int, generator: torch.Generator,
                       augment: Callable | None = None, min_lr_scale: float | None = None) -> float | None:
    """Train only the shared centroids (Deep Compression §3.3), then write ``C[I]`` into the model.

    The gradient of centroid ``k`` is ``sum_ij dL/dW_ij 1(I_ij = k)`` (autograd through
    the gather); Adam at ``lr`` updates the centroids.  Indices, masks, biases and
    batch-norm statistics do not change.  ``shared[i].centroids`` is replaced in place.

    Args:
        model: the model whose layers ``shared`` describes.
        shared: output of :func:`share_weights`.
        X, y: training inputs and labels.
        epochs: passes over ``X`` (0: only apply the sharing).
        lr: Adam learning rate.
        batch_size: minibatch size.
        generator: source of the minibatch order (and of ``augment``'s randomness).
        augment: optional batch transform (e.g. the run's affine distortion).
        min_lr_scale: if given, the learning rate follows a cosine annealing from ``lr``
            to ``lr * min_lr_scale`` over the call (nestsynth's ``cosine`` schedule);
            None keeps it constant.

    Returns:
        The mean training loss of the last epoch (None for 0 epochs).
    """
    net = CentroidModel(model, shared)
    was_training = model.training
    model.eval()  # batch norm: running statistics, kept fixed
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    per_epoch = math.ceil(len(X) / batch_size)
    loss = None
    try:
        for e in range(epochs):
            lr_at = None if min_lr_scale is None else (
                lambda b, e=e: cosine_lr(e * per_epoch + b, epochs * per_epoch, lr, min_lr_scale))
            loss = train_epoch(net, X, y, optimizer, batch_size, generator, augment, None, lr_at)
    finally:
        model.train(was_training)
    for s, c in zip(shared, net.centroids):
        s.centroids = c.detach().cpu().clone()
    apply_sharing(model, shared)
    return loss
