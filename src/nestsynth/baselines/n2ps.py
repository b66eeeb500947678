"""Neural Network Pruning by Significance, ``n2ps`` (Augasta & Kathirvalavakumar 2011; seed 004).

Seed 004 summarises N2PS as: "the significance of each neuron ... is calculated by
getting the normalized average value of neurons for each layer, followed by comparing
each neuron value with the normalized average value.  The neurons which have less
than significant value [are] pruned and the network is retrained".  The paper's
abstract (Neural Processing Letters 34:241-258) adds that the significance measure
"is calculated by the sigmoidal activation value of the node and all the weights of
its outgoing connections" and that every node whose significance is below the
threshold is eliminated.

Definition followed, for hidden neuron j of hidden layer h (all hidden layers,
every iteration, on the current network):

* Activation value: ``a_j = (1/P) sum_p f_j(x_p)``, the output of the neuron (after
  batch norm and activation, eval mode) averaged over ``samples`` training
  patterns (the "normalized" net value: the paper's total over patterns divided by
  P, so that the measure does not depend on the number of patterns).
* Significance (``measure = "sigmoid"``, the paper's)::

      S_j = sum_k sigma(a_j * w_kj)

  over the neuron's live outgoing connections k (the next layer's neurons, the
  output neurons for the last hidden layer), sigma the logistic function.
* Threshold: the layer's average significance, ``T_h = threshold_scale * mean_j S_j``
  (``threshold_scale`` = 1 is the paper's rule).  Every neuron with ``S_j < T_h`` is
  insignificant and removed with :func:`nestsynth.sparse.keep_units` (its row of
  ``layers[h]``, its batch-norm entries and its column of ``layers[h + 1]`` go);
  at least ``min_neurons`` of the layer (the most significant) are kept.  The other
  neurons are not changed (no compensation: N2PS relies on retraining), so right
  after the removal the next layer's pre-activation lacks exactly the terms
  ``w_kj * f_j(x)`` of the removed neurons.
* Procedure: train the dense network (``dense_epochs``); then for ``iterations``
  rounds: compute every hidden layer's significances on the current network, remove
  the insignificant neurons of every hidden layer, retrain ``retrain_epochs``
  epochs.  The default is the seed's single pass (``iterations = 1``: significance,
  removal, retraining).  With more rounds, pruning stops when nothing is
  insignificant any more, or when the retrained network's accuracy is no longer
  acceptable: if its validation error exceeds the dense reference's by more than
  ``tolerance``, that round is undone (the previous network is restored) and
  pruning stops.  The default ``tolerance = 1`` never undoes a round (an error rate
  cannot exceed 1), so the default result is always the rule's own; set e.g. 0.01
  to iterate "while the accuracy is acceptable".

The final number of weights is whatever the rule gives (no target sparsity); it is
``sum_l n_l * n_{l+1}`` of the surviving widths (the network stays dense between its
surviving neurons).

Deviations: the paper also prunes input neurons (features); the harness's input
width is fixed, so only hidden neurons are pruned.  The paper's networks have
sigmoid hidden units; here the activation value is the output of whatever the
reference uses (ReLU by default), while the significance keeps the paper's
sigma(a_j w_kj).  With ReLU a dead neuron (a_j = 0) scores 0.5 per connection, i.e.
about the layer average; ``measure = "abs"`` is an optional magnitude variant,
``S_j = sum_k |a_j w_kj|`` (not the paper's), for which dead neurons score 0.
Source caveat: the seed only summarises N2PS and the paper's full text was not at
hand; the measure above is built from the paper's abstract ("sigmoidal activation
value of the node and all the weights of its outgoing connections", threshold from
the layer's significances) and the seed's "normalized average value" (read as the
pattern-averaged activation, compared with the layer's average significance).

MLP references only (a CNN reference is refused with a NestError before any work): the
significance is defined for fully connected neurons, not for feature maps.  Chains only
(a graph reference is refused the same way): a neuron of hidden layer h is removed with
its column of layer h + 1, the only layer that reads it in a chain.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import check
from ..distributed import current
from ..sparse import keep_units
from .context import chain_only, mlp_only
from .registry import register_method

MEASURES = ("sigmoid", "abs")


@dataclass
class N2psConfig:
    """``[methods.n2ps]``: N2PS neuron pruning by significance, with retraining."""

    dense_epochs: int = 20  # training of the dense network before pruning
    iterations: int = 1  # pruning rounds at most (each followed by retraining)
    retrain_epochs: int = 10  # retraining after each round
    threshold_scale: float = 1.0  # threshold = scale * mean significance of the layer (paper: 1)
    measure: str = "sigmoid"  # "sigmoid": sum_k sigma(a_j w_kj) (paper); "abs": sum_k |a_j w_kj|
    samples: int = 0  # training patterns for the activation values (<= 0: all)
    tolerance: float = 1.0  # undo a round whose val error exceeds the dense one by more (>= 1: off)
    min_neurons: int = 1  # neurons always kept per hidden layer

    def validate(self, prefix: str) -> None:
        """Range-check every field (``NestError`` on the first failure)."""
        check(self.dense_epochs >= 0, f"{prefix}.dense_epochs", self.dense_epochs, ">= 0")
        check(self.iterations >= 0, f"{prefix}.iterations", self.iterations, ">= 0")
        check(self.retrain_epochs >= 0, f"{prefix}.retrain_epochs", self.retrain_epochs, ">= 0")
        check(0 < self.threshold_scale <= 10, f"{prefix}.threshold_scale", self.threshold_scale,
              "in (0, 10]")
        check(self.measure in MEASURES, f"{prefix}.measure", self.measure, " or ".join(MEASURES))
        check(self.tolerance >= 0, f"{prefix}.tolerance", self.tolerance, ">= 0")
        check(self.min_neurons >= 1, f"{prefix}.min_neurons", self.min_neurons, ">= 1")


def mean_activations(model, X: torch.Tensor, chunk: int = 4096) -> list[torch.Tensor]:
    """Average output of every hidden neuron over the patterns X (eval mode).

    Args:
        model: a SparseMLP (mode restored afterwards).
        X: (P, in) patterns.
        chunk: patterns per forward pass.

    Returns:
        One float64 (n_h,) tensor per hidden layer: ``(1/P) sum_p f_j(x_p)``.
    """
    was_training = model.training
    model.eval()
    n = max(len(X), 1)
    X = current().shard(X)[0]  # under torchrun: this rank's patterns, the sums summed across ranks
    sums = [torch.zeros(w, dtype=torch.float64, device=X.device) for w in model.widths[1:-1]]
    with torch.no_grad():
        for start in range(0, len(X), chunk):
            inputs, _ = model.trace(X[start:start + chunk])
            for s, a in zip(sums, inputs[1:]):  # inputs[h + 1] = output of hidden layer h
                s += a.double().sum(0)
    model.train(was_training)
    return [s / n for s in current().all_reduce_sum(sums)]


def significance(model, means: list[torch.Tensor], measure: str = "sigmoid") -> list[torch.Tensor]:
    """N2PS significance of every hidden neuron.

    Args:
        model: a SparseMLP.
        means: :func:`mean_activations` of the model.
        measure: ``"sigmoid"``: ``S_j = sum_k sigma(a_j w_kj)`` (the paper);
            ``"abs"``: ``S_j = sum_k |a_j w_kj|``; sums over live outgoing connections.

    Returns:
        One float64 (n_h,) tensor per hidden layer.
    """
    out = []
    for h, a in enumerate(means):
        nxt = model.layers[h + 1]
        live = nxt.mask.detach() != 0  # (n_{h+1}, n_h)
        z = nxt.weight.detach().double() * a.to(nxt.weight.device).unsqueeze(0)  # a_j w_kj
        term = torch.sigmoid(z) if measure == "sigmoid" else z.abs()
        out.append(torch.where(live, term, torch.zeros_like(term)).sum(0))
    return out


def insignificant(sig: torch.Tensor, threshold_scale: float = 1.0, min_neurons: int = 1) -> torch.Tensor:
    """Neurons to remove: ``S_j < threshold_scale * mean(S)``, at least ``min_neurons`` kept.

    When the rule would remove too many, only the least significant ones go (ties by
    position, the earlier neuron removed first).

    Returns:
        (n_h,) bool tensor, True = remove.
    """
    remove = sig < threshold_scale * sig.mean()
    excess = int(remove.sum()) - (len(sig) - min(min_neurons, len(sig)))
    if excess > 0:  # keep the most significant min_neurons
        order = torch.sort(sig, stable=True).indices
        remove = torch.zeros_like(remove)
        remove[order[:len(sig) - min(min_neurons, len(sig))]] = True
    return remove


def prune_round(model, X: torch.Tensor, measure: str = "sigmoid", threshold_scale: float = 1.0,
                min_neurons: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One N2PS removal on every hidden layer, in place (significances from the same network).

    Returns:
        (significances, removed): per hidden layer, the (n_h,) significances before the
        removal and the (n_h,) bool mask of removed neurons.
    """
    sig = significance(model, mean_activations(model, X), measure)
    removed = [insignificant(s, threshold_scale, min_neurons) for s in sig]
    for h, rem in enumerate(removed):
        keep_units(model, h, (~rem).nonzero().squeeze(1))
    return sig, removed


@register_method("n2ps", N2psConfig,
                 "N2PS (Augasta & Kathirvalavakumar 2011): remove hidden neurons whose significance "
                 "sum_k sigma(a_j w_kj) is below the layer average, retrain, repeat")
@chain_only("it removes the neurons of hidden layer h together with their inputs to layer h + 1, which "
            "only a chain has")
@mlp_only("its neuron significance is defined for fully connected neurons only")
def run_n2ps(ctx, mcfg: N2psConfig):
    """N2PS on the reference architecture; returns the pruned, retrained model."""
    model = ctx.train_dense(mcfg.dense_epochs)
    ref = ctx.dense["val_error"] if ctx.dense else ctx.val_error(model)  # the accuracy rounds must keep
    it, val = 0, ref  # val: validation error of the current (accepted) network
    for it in range(1, mcfg.iterations + 1):
        X, _ = ctx.batch(mcfg.samples)
        backup = copy.deepcopy(model)
        _, removed = prune_round(model, X, mcfg.measure, mcfg.threshold_scale, mcfg.min_neurons)
        counts = [int(r.sum()) for r in removed]
        if sum(counts) == 0:  # nothing insignificant any more
            ctx.log("converged", it, model, val=val)
            break
        pruned_widths = model.widths[1:-1]
        if mcfg.retrain_epochs > 0:
            ctx.train(model, mcfg.retrain_epochs)
        new_val = ctx.val_error(model)
        if new_val > ref + mcfg.tolerance:  # accuracy no longer acceptable: undo the round, stop
            model = backup
            ctx.log("rejected", it, model, val=val, rejected_val_error=new_val,
                    rejected_widths=pruned_widths)
            break
        val = new_val
        ctx.log("prune", it, model, val=val, removed=counts)
    model.zero_dormant()
    ctx.log("final", it + 1, model, val=val)
    return model
