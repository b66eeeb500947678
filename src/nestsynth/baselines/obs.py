"""Layer-wise Optimal Brain Surgeon, ``lobs`` (Dong, Chen & Pan, NeurIPS 2017; seed 004).

Definition followed (L-OBS, Dong et al. 2017, as summarised by seed 004):

* A dense network is trained (``dense_epochs``) and recorded as the reference.
* Each linear layer l is pruned on its own, against its own error.  With
  ``x_p`` the input of layer l for training example p (taken from the trained
  dense model by ``model.trace`` on ``samples`` training examples, in eval mode)
  and ``y_p = W x_p`` its (pre-normalisation) output, the layer error of a
  perturbed weight ``W + dW`` is::

      E(dW) = 1/(2n) sum_p ||dW x_p||^2 = 1/2 sum_i dw_i^T H dw_i,
      H = (1/n) sum_p x_p x_p^T                                   (in_l x in_l)

  so the Hessian of the layer error is block diagonal with the SAME block H for
  every output row i.  The bias is folded in by default (``fold_bias``): ``x_p`` gets
  a constant 1 appended, so the bias is one more coordinate of every row that the
  surgeon may move to compensate, but it is never pruned and never counted.
* OBS on one row: removing weight q of row i (``dw_iq = -w_iq``) at the least
  increase of E gives::

      L_iq  = w_iq^2 / (2 [H^-1]_qq)                (the sensitivity, = the increase of E)
      dw_i  = -(w_iq / [H^-1]_qq) H^-1[:, q]        (the compensating update of row i)

  The weight with the smallest ``L_iq`` over the whole layer is removed, its row is
  updated, and this repeats until the layer has exactly
  ``round(numel * (1 - sparsity))`` weights left (``output_sparsity`` for the last
  layer, default the same).
* Keeping pruned weights at zero: once a row has pruned entries P_i, the exact
  OBS step is the one constrained to keep them at zero, which is the formula
  above with ``H^-1`` replaced by the inverse of H restricted to the row's surviving
  inputs A_i, ``(H_{A_i A_i})^-1`` (its entries outside A_i are zero, so the update
  never touches a pruned weight).  Every row therefore carries its own restricted
  inverse; rows that never lost a weight share ``H^-1``.  The restricted inverse is
  refreshed EXACTLY by the Schur-complement downdate
  ``R_{K K} - R_{K Q} (R_{Q Q})^-1 R_{Q K}`` (K kept, Q removed positions), which
  equals ``(H_{A'A'})^-1`` without inverting again.
* ``recompute_every`` = k (the seed's practical variant, "recalculate the inverse
  Hessian only after every 2000 pruned weights"): the k weights with the smallest
  L (computed with the current inverses) are removed in one block, one after the
  other in increasing L, each with the OBS update of the row's current (stale within
  the block) inverse; weights of the same row removed earlier in the block are put
  back to zero after each update (projection onto the constraint); then the
  inverses of the touched rows are refreshed.  k = 1 is the exact constrained
  greedy L-OBS: every step uses the exact restricted inverse, pruned weights are
  never moved, and the final row equals the H-orthogonal projection of the dense
  row onto its surviving support.  k = 0 (default) means 1% of the layer's weights.

Numerics: H, its damping and every inverse are float64 (numpy).  Damping:
``H + damping * mean(diag H) * I`` (``damping`` = 1e-4 by default; 0 is allowed when H
is non-singular), which makes H invertible when some inputs are constant (e.g. MNIST
border pixels).  The sensitivities and the refreshes use the damped H; the logged
``layer_error`` is E of the final dW with the undamped H.

Cost: a layer of ``out`` rows and D = in + 1 columns needs ``out`` restricted inverses
(up to ``out * D^2`` float64, about 1.5 GB at the peak for the 300 x 785 first layer of
LeNet-300-100, shrinking as rows lose weights) and about ``out * D^3 / 3`` flops in
BLAS calls; with the default k that layer takes about 15-20 s on one core.  k = 1
on that layer is exact but slow (one refresh per removal: minutes).

Then the pruned network is retrained ``retrain_epochs`` epochs with its masks fixed
(pruned weights stay exactly zero: their gradient is zero through ``W * M``).

Deviations: the Hessians of every layer are computed from the dense trained model
before anything is pruned (layer-wise independence, as in L-OBS), not from the
outputs of already-pruned earlier layers.  The layer error is on the output of the
linear map, before batch norm and activation (with batch norm the input x_p is the
normalised, activated output of the previous layer, in eval mode).  L-OBS's
per-layer sparsity is set by a target sparsity per layer (the paper uses
per-layer compression ratios); here one ``sparsity`` for every layer, optionally
another for the output layer.  Ties in L are broken by position (row-major).

Conv layers (the paper's extension, Dong et al. 2017 Sec. 3.3): a conv kernel reshaped to
``(out, in*k*k)`` (the layout of ``weight.flatten(1)``, which is also ``F.unfold``'s) acts on
every input patch ``x_{p,t}`` (image p, output position t; the layer's stride and padding),
so the layer error of ``dW`` is ``1/(2nP) sum_{p,t} ||dW x_{p,t}||^2`` and its Hessian block
is the linear one with the inputs replaced by every patch of every image::

    H = (1/(n P)) sum_p sum_t x_{p,t} x_{p,t}^T          (in*k*k (+1) square, P positions)

accumulated over chunks of images (the patch matrix of the whole sample is never formed),
float64; everything after H (OBS steps, restricted inverses, counts) is the linear layer's.
Approximation: the partial-area mask ``A`` (out, H_out, W_out) of a MaskedConv2d is ignored
by the Hessian: every output channel uses the H of all positions, although the positions a
channel does not compute contribute nothing to its error (one Hessian per distinct area
pattern would be exact).  L-OBS prunes the dense reference (``ctx.train_dense``), whose area
is all ones, so in this harness the Hessian is exact.  Cost of a conv layer: one
``(D, n P) @ (n P, D)`` product for H plus the OBS steps of ``out`` rows of D = in*k*k + 1.

Every reference runs: an MLP, a sequential CNN (SparseCNN) and a graph network (SparseGraph,
residual adds and concatenations included): each weight layer's inputs come from
``model.trace`` (what the layer reads, in the order of ``model.layers``), and each layer is
pruned on its own; ``output_sparsity`` applies to the last layer of ``model.layers``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import check
from ..distributed import current
from ..sparse import MaskedConv2d, set_mask
from .registry import register_method


@dataclass
class LobsConfig:
    """``[methods.lobs]``: Layer-wise Optimal Brain Surgeon, then retraining."""

    dense_epochs: int = 20  # training of the dense reference before pruning
    sparsity: float = 0.9  # per-layer fraction of weights removed (exact count)
    output_sparsity: float = -1.0  # sparsity of the last layer; < 0: same as ``sparsity``
    samples: int = 10000  # training examples for the layer Hessians (<= 0: the whole split)
    damping: float = 1e-4  # H + damping * mean(diag H) * I
    recompute_every: int = 0  # prunes between inverse refreshes (1: exact; 0: 1% of the layer)
    fold_bias: bool = True  # the bias is an extra (never pruned) coordinate of each row
    retrain_epochs: int = 10  # retraining of the pruned network (masks fixed)

    def validate(self, prefix: str) -> None:
        """Range-check every field (``NestError`` on the first failure)."""
        check(self.dense_epochs >= 0, f"{prefix}.dense_epochs", self.dense_epochs, ">= 0")
        check(0 <= self.sparsity < 1, f"{prefix}.sparsity", self.sparsity, "in [0, 1)")
        check(self.output_sparsity < 1, f"{prefix}.output_sparsity",
              self.output_sparsity, "negative (same as sparsity) or in [0, 1)")
        check(self.damping >= 0, f"{prefix}.damping", self.damping, ">= 0")
        check(self.recompute_every >= 0, f"{prefix}.recompute_every", self.recompute_every,
              ">= 0 (0: 1% of the layer)")
        check(self.retrain_epochs >= 0, f"{prefix}.retrain_epochs", self.retrain_epochs, ">= 0")
        check(isinstance(self.fold_bias, bool), f"{prefix}.fold_bias", self.fold_bias, "true or false")


# ---- the layer Hessian ---------------------------------------------------------------
PATCH_CHUNK = 1 << 22  # patch-matrix entries per chunk of images in conv_hessian_sum


def patches(X: torch.Tensor, layer) -> torch.Tensor:
    """Every input patch of a conv layer: (B, C, H, W) -> (B * P, C*k*k), rows image-major
    then position-major (row-major over the output grid); columns laid out as
    ``layer.weight.flatten(1)`` (channel, then kernel row, then kernel column)."""
    k = layer.kernel_size
    cols = torch.nn.functional.unfold(X, k, padding=layer.padding, stride=layer.stride)  # (B, C*k*k, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def conv_hessian_sum(X: torch.Tensor, layer, fold_bias: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum_{p,t} x_{p,t} x_{p,t}^T, P)`` over every patch of every image of X, float64.

    Args:
        X: (B, C, H, W) inputs of the MaskedConv2d ``layer``.
        layer: the conv layer (its kernel size, stride and padding; its area is ignored).
        fold_bias: append a constant-1 coordinate (last) to every patch.

    Returns:
        ((D, D) float64 tensor on the CPU, positions per image P).
    """
    X = X.detach().to("cpu", torch.float64)
    D = layer.weight[0].numel() + (1 if fold_bias else 0)
    P = layer.out_hw[0] * layer.out_hw[1]
    S = torch.zeros(D, D, dtype=torch.float64)
    step = max(1, PATCH_CHUNK // max(1, P * D))
    for start in range(0, len(X), step):
        rows = patches(X[start:start + step], layer)
        if fold_bias:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
        S += rows.T @ rows
    return S, P


def layer_hessian(X: torch.Tensor, fold_bias: bool = True, layer=None) -> np.ndarray:
    """``H = (1/n) sum_p x_p x_p^T`` of a layer's inputs, float64.

    For a MaskedConv2d ``layer`` the x_p are every patch of every image:
    ``H = (1/(n P)) sum_p sum_t x_{p,t} x_{p,t}^T`` (see the module docstring).

    Args:
        X: (n, in) inputs of a linear layer, or (n, C, H, W) inputs of the conv ``layer``.
        fold_bias: append a constant-1 column (the bias coordinate, last).
        layer: the layer X feeds; only a MaskedConv2d changes anything.

    Returns:
        (D, D) array, D = in + 1 with the bias folded, else in (in*k*k for a conv layer).
    """
    n = max(len(X), 1)
    X = current().shard(X)[0]  # under torchrun: each rank's inputs, the sums summed across ranks
    if isinstance(layer, MaskedConv2d):
        S, P = conv_hessian_sum(X, layer, fold_bias)
        if current().active:
            S = current().all_reduce_sum([S.to(current().device())])[0].cpu()
        return S.numpy() / (n * P)
    Xd = X.detach().to("cpu", torch.float64).flatten(1).numpy()
    if fold_bias:
        Xd = np.concatenate([Xd, np.ones((len(Xd), 1))], axis=1)
    if not current().active:
        return Xd.T @ Xd / n
    H = torch.from_numpy(Xd.T @ Xd).to(current().device())
    return current().all_reduce_sum([H])[0].cpu().numpy() / n


def damp(H: np.ndarray, damping: float) -> np.ndarray:
    """``H + damping * mean(diag H) * I`` (a new array)."""
    out = H.copy()
    lam = damping * float(np.mean(np.diag(H))) if len(H) else 0.0
    out[np.diag_indices_from(out)] += lam
    return out


# ---- per-row restricted inverses --------------------------------------------------------
class _RowInverses:
    """For every row i, its support and the inverse of H restricted to it.

    Storage per row: sorted column indices ``ids``, a flag ``alive`` per index and the
    matrix ``(H_{AA})^-1`` laid out on ``ids``, with exact zeros in the rows and columns
    of indices that died since the last compaction (so an update read from it never
    moves a pruned weight).  The matrix is compacted (dead indices dropped) once a
    quarter of its indices are dead.  Rows whose support is every column share
    ``H^-1`` until their first removal.
    """

    COMPACT = 0.25  # compact a row's matrix when this fraction of its indices is dead

    def __init__(self, H: np.ndarray, active: np.ndarray):
        full = np.arange(H.shape[0])
        G = np.linalg.inv(H)
        self.G = (G + G.T) / 2  # exact symmetry: rows are read as columns
        self.ids: list[np.ndarray] = []
        self.alive: list[np.ndarray] = []
        self.inv: list[np.ndarray | None] = []  # None: the shared G
        for row in active:
            a = full if row.all() else np.flatnonzero(row)
            self.ids.append(a)
            self.alive.append(np.ones(len(a), dtype=bool))
            if row.all():
                self.inv.append(None)
            else:  # a row that already had dormant weights: invert its own block
                r = np.linalg.inv(H[np.ix_(a, a)])
                self.inv.append((r + r.T) / 2)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, restricted inverse laid out on them; zero rows/cols at dead indices)."""
        return self.ids[i], self.G if self.inv[i] is None else self.inv[i]

    def diag(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(live indices of row i, diagonal of its restricted inverse there)."""
        ids, r = self.get(i)
        alive = self.alive[i]
        return ids[alive], np.diag(r)[alive]

    def remove(self, i: int, cols: list[int]) -> None:
        """Drop ``cols`` from row i's support: exact Schur-complement downdate.

        ``(H_{KK})^-1 = R_KK - R_KQ (R_QQ)^-1 R_QK`` for R = (H_{AA})^-1, K = A minus Q;
        computed in place on the full layout, then the Q rows/columns are set to 0.
        """
        ids, r = self.get(i)
        if self.inv[i] is None:
            r = self.G.copy()
        pos = np.searchsorted(ids, np.asarray(cols))
        b = r[:, pos]  # (a, |Q|) copy
        r -= b @ np.linalg.solve(r[np.ix_(pos, pos)], b.T)
        r[pos, :] = 0.0
        r[:, pos] = 0.0
        alive = self.alive[i]
        alive[pos] = False
        if (~alive).sum() > self.COMPACT * len(alive):
            kk = np.flatnonzero(alive)
            r = r.take(kk, 0).take(kk, 1)
            r = (r + r.T) / 2
            self.ids[i], self.alive[i] = ids[kk], np.ones(len(kk), dtype=bool)
        self.inv[i] = r


@dataclass
class LobsResult:
    """Outcome of :func:`lobs_prune`.

    Attributes:
        weight: (out, D) pruned and compensated weights (pruned entries exactly 0).
        active: (out, D) bool, surviving entries (the folded bias column stays True).
        order: the removed (row, column) pairs, in removal order.
        losses: the sensitivity L of each removal when it was chosen (exact increase of the
            layer error for ``recompute_every = 1``).
        refreshes: inverse refresh rounds done.
    """

    weight: np.ndarray
    active: np.ndarray
    order: list[tuple[int, int]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    refreshes: int = 0


def _smallest(L: np.ndarray, m: int) -> np.ndarray:
    """Flat indices of the m smallest entries of L, ascending (ties: lower index first)."""
    flat = L.ravel()
    part = np.argsort(flat, kind="stable")[:m] if m >= flat.size else np.argpartition(flat, m - 1)[:m]
    return part[np.lexsort((part, flat[part]))]


def _one_blas_thread():
    """Single-threaded BLAS: the many small (<= 785 x 785) products gain nothing from threads,
    and a multi-threaded OpenBLAS on a busy machine is many times slower (spin-waiting)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def lobs_prune(W: np.ndarray, H: np.ndarray, active: np.ndarray, n_prune: int,
               recompute_every: int = 1, n_fixed: int = 0) -> LobsResult:
    """Greedy layer-wise OBS on the rows of one layer (all rows share the Hessian block H).

    Args:
        W: (out, D) weights (float64; inactive entries must be 0).
        H: (D, D) symmetric positive definite Hessian block (already damped).
        active: (out, D) bool, entries still alive; the last ``n_fixed`` columns
            (the folded bias) are moved but never removed.
        n_prune: entries to remove (clipped to the removable count).
        recompute_every: k >= 1, removals between refreshes of the inverses
            (1 = exact constrained OBS).
        n_fixed: trailing columns that are never removed.

    Returns:
        A :class:`LobsResult`.
    """
    with _one_blas_thread():
        return _lobs_prune(W, H, active, n_prune, recompute_every, n_fixed)


def _lobs_prune(W, H, active, n_prune, recompute_every, n_fixed) -> LobsResult:
    """The body of :func:`lobs_prune` (same arguments)."""
    W = np.array(W, dtype=np.float64)  # (out, D), a copy
    active = np.array(active, dtype=bool)
    out, D = W.shape
    cand = active.copy()
    if n_fixed:
        cand[:, D - n_fixed:] = False
    inv = _RowInverses(H, active)
    diag = np.full((out, D), np.inf)  # [R_i]_qq on each row's support
    for i in range(out):
        ids, d = inv.diag(i)
        diag[i, ids] = d
    L = np.where(cand, W ** 2 / (2 * diag), np.inf)  # (out, D) sensitivities
    res = LobsResult(W, active)
    remaining = min(int(n_prune), int(cand.sum()))
    k = max(1, int(recompute_every))
    while remaining > 0:
        m = min(k, remaining)
        touched: dict[int, list[int]] = {}
        for f in _smallest(L, m):
            i, q = divmod(int(f), D)
            res.order.append((i, q))
            res.losses.append(float(L[i, q]))
            ids, r = inv.get(i)
            p = int(np.searchsorted(ids, q))
            col = r[p]  # R_i[:, q] (R_i symmetric), laid out on the row's indices
            W[i, ids] -= (W[i, q] / col[p]) * col  # dw_i = -(w_iq / [R_i]_qq) R_i[:, q]
            W[i, q] = 0.0
            earlier = touched.setdefault(i, [])
            if earlier:  # stale inverse inside a block: project back onto the constraint
                W[i, earlier] = 0.0
            earlier.append(q)
        for i, cols in touched.items():  # refresh: exact restricted inverses of touched rows
            inv.remove(i, cols)
            active[i, cols] = cand[i, cols] = False
            ids, d = inv.diag(i)
            diag[i] = np.inf
            diag[i, ids] = d
            L[i] = np.where(cand[i], W[i] ** 2 / (2 * diag[i]), np.inf)
        res.refreshes += 1
        remaining -= m
    return res


def layer_error(dW: np.ndarray, H: np.ndarray) -> float:
    """``1/2 sum_i dw_i^T H dw_i``: the layer-output error of the weight change dW (out, D)."""
    return 0.5 * float(np.sum((dW @ H) * dW))


# ---- applying it to a model --------------------------------------------------------------
def layer_inputs(model, X: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every weight layer on X (eval mode, no grad); the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs, _ = model.trace(X)
    model.train(was_training)
    return [x.detach() for x in inputs]


def kept_weights(numel: int, sparsity: float) -> int:
    """Weights kept by a layer of ``numel`` weights at ``sparsity``: ``round(numel*(1-s))``."""
    return int(round(numel * (1.0 - sparsity)))


def prune_layer(layer, X: torch.Tensor, sparsity: float, damping: float = 1e-4,
                recompute_every: int = 0, fold_bias: bool = True) -> dict:
    """L-OBS on one MaskedLinear or MaskedConv2d in place: new weights (and bias), mask installed.

    A conv kernel is pruned as the (out, in*k*k) matrix ``weight.flatten(1)`` with the patch
    Hessian of :func:`layer_hessian`.

    Args:
        layer: the MaskedLinear or MaskedConv2d.
        X: (n, in) its inputs ((n, C, H, W) for a conv layer).
        sparsity: the layer's target sparsity (exactly ``round(numel*(1-s))`` weights kept,
            or the live count if it is already smaller).
        damping: relative damping of H.
        recompute_every: k (0: 1% of the layer's weights).
        fold_bias: compensate with the bias too.

    Returns:
        Plain statistics: removed count, predicted (sum of L) and actual layer error, refreshes.
    """
    w = layer.weight.detach().to("cpu", torch.float64).flatten(1)
    mask = layer.mask.detach().to("cpu").flatten(1) != 0
    if fold_bias:
        w = torch.cat([w, layer.bias.detach().to("cpu", torch.float64).unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.bool)], 1)
    W0, active = w.numpy(), mask.numpy()
    H_raw = layer_hessian(X, fold_bias, layer)
    numel = layer.weight.numel()
    n_prune = max(0, layer.active_connections() - kept_weights(numel, sparsity))
    k = recompute_every if recompute_every > 0 else max(1, int(round(0.01 * numel)))
    res = lobs_prune(W0, damp(H_raw, damping), active, n_prune, k, n_fixed=1 if fold_bias else 0)
    d = w.shape[1] - (1 if fold_bias else 0)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(res.weight[:, :d]).reshape(layer.weight.shape).to(layer.weight))
        if fold_bias:
            layer.bias.copy_(torch.from_numpy(res.weight[:, d]).to(layer.bias))
    set_mask(layer, torch.from_numpy(res.active[:, :d]).reshape(layer.mask.shape).to(layer.mask))
    return {"removed": len(res.order), "kept": layer.active_connections(),
            "predicted_error": float(np.sum(res.losses)),
            "layer_error": layer_error(res.weight - W0, H_raw), "refreshes": res.refreshes,
            "recompute_every": k}


@register_method("lobs", LobsConfig,
                 "Layer-wise OBS (Dong et al. 2017): per layer remove min w^2/(2[H^-1]qq) with "
                 "second-order compensation, then retrain")
def run_lobs(ctx, mcfg: LobsConfig):
    """L-OBS on the reference architecture (MLP, CNN or graph network); returns the pruned,
    retrained model."""
    model = ctx.train_dense(mcfg.dense_epochs)
    X, _ = ctx.batch(mcfg.samples)
    inputs = layer_inputs(model, X)  # all Hessians from the dense model (layer independence)
    last = len(model.layers) - 1
    for l, layer in enumerate(model.layers):
        s = mcfg.output_sparsity if (l == last and mcfg.output_sparsity >= 0) else mcfg.sparsity
        stats = prune_layer(layer, inputs[l], s, mcfg.damping, mcfg.recompute_every, mcfg.fold_bias)
        ctx.log("prune", l + 1, model, layer=l, sparsity=s, samples=len(X), **stats)
    if mcfg.retrain_epochs > 0:
        ctx.train(model, mcfg.retrain_epochs)
    model.zero_dormant()
    ctx.log("final", len(model.layers) + 1, model)
    return model
