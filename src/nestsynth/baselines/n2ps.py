"""Neural Network Pruning by Significance, ``n2ps`` (Augasta & Kathirvalavakumar 2011; seed 004),
on MLP, CNN and graph references.

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

CNN and graph references.  The paper defines the significance for the hidden neurons of
a fully connected chain; here it is generalised to every *unit* that can be removed as a
whole, keeping the paper's form "sum, over the unit's outgoing connections, of
sigma(activation value x weight)":

* Units: a chain's hidden layer h (SparseMLP, SparseCNN: neurons of hidden linear
  layers, output channels / feature maps of conv layers), or a resizable coupled group of
  a graph network (:meth:`nestsynth.graph.SparseGraph.groups`: the layers whose outputs
  are added into one stream of units; the output stream and a stream summed with the
  network input are fixed by the data and never pruned).  See :func:`streams`.
* Outgoing connections of unit c: every weight that reads it (the *reads* of
  :mod:`nestsynth.graph.units`): a Linear reader's column(s) of c (one column per
  neuron; all ``H*W`` flattened columns of a channel read through a flatten); a conv
  reader's input channel c at every output channel and every kernel position
  (``out x k x k`` weights).  A chain's hidden layer h is read by layer h + 1 only; a
  graph group may be read by several consumers (every block of a residual stage and its
  down-sampling shortcut), and a consumer that reads the stream twice counts twice.
  Only live (unmasked) weights count.
* Activation value per connection: the mean, over the ``samples`` patterns, of the
  input value the weight multiplies, taken where the reader reads it (after batch norm,
  activation, pooling, residual sums: the reader's input in the model's ``trace``).  For a
  Linear column this is the pattern mean of that input feature (an MLP neuron: the
  paper's ``a_j``; a flattened channel: one value per spatial position); for conv
  kernel entry (c, u, v) it is also averaged over the conv's output positions, i.e.
  the mean of the zero-padded input at the positions that kernel entry visits
  (``unfold`` of the mean input map, :func:`mean_activations`).  So the term of one
  connection is ``sigma(a w)`` with ``a`` what that very weight sees on average, which
  is exactly the paper's ``sigma(a_j w_kj)`` for an MLP.
* Significance of unit c: ``S_c = sum`` of those terms over all of c's connections, at
  all reads of its stream (:func:`significance`).  A coupled unit is one stream value
  read by every consumer, so each read counts once; summing a per-member significance
  over the group's members instead would count every read once per member, i.e. scale
  every unit of the group by the same factor, which selects exactly the same units
  against the group's own average.
* Threshold: the stream's average significance (the paper's per-layer average; for a
  group, the average over the group's units), ``threshold_scale`` and ``min_neurons``
  as for an MLP.  The insignificant units are removed from every member, batch norm
  and reader at once (:func:`remove_stream_units`: ``keep_units`` on a chain,
  :meth:`~nestsynth.graph.SparseGraph.remove_units` on a graph group), again without
  compensation, and the network is retrained.

Departures from the paper on these references (beyond the MLP ones above): the paper
has no feature maps, so the per-kernel-position activation value (averaged over output
positions, zero padding included) and the sum over ``out x k x k`` kernel weights are
this module's generalisation; with the sigmoid measure each live connection scores
about 0.5 whatever its size, so a channel read by a conv (``k*k`` connections per output
channel) or through a flatten (``H*W`` per output neuron) is measured mostly by its
number of live connections, as an MLP neuron is by its fan-out.  A conv's area mask
(partial-area convolution, only in NeST seeds; N2PS starts from the dense network) is
not taken into account.  Graph groups that are the network output or are summed with
the input are never pruned; the weight count after pruning is whatever the surviving
widths give, not ``sum_l n_l * n_{l+1}`` on a graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check
from ..distributed import current
from ..graph import SparseGraph
from ..graph.ir import Group, Slice
from ..graph.units import current as current_group
from ..graph.units import group_reads, member_indices
from ..select import top_k
from ..sparse import MaskedConv2d, keep_units
from .registry import register_method

MEASURES = ("sigmoid", "abs")


@dataclass
class N2psConfig:
    """``[methods.n2ps]``: N2PS neuron pruning by significance, with retraining."""

    dense_epochs: int = 20  # training of the dense network before pruning
    iterations: int = 1  # pruning rounds at most (each followed by retraining)
    retrain_epochs: int = 10  # retraining after each round
    threshold_scale: float = 1.0  # threshold = scale * mean significance of the layer/group (paper: 1)
    measure: str = "sigmoid"  # "sigmoid": sum_k sigma(a_j w_kj) (paper); "abs": sum_k |a_j w_kj|
    samples: int = 0  # training patterns for the activation values (<= 0: all)
    tolerance: float = 1.0  # undo a round whose val error exceeds the dense one by more (>= 1: off)
    min_neurons: int = 1  # units always kept per hidden layer (coupled group of a graph)

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


@dataclass(frozen=True)
class Stream:
    """Units that are pruned together: hidden layer h of a chain, or a resizable coupled group
    of a graph network.

    Attributes:
        members: indices (in ``model.layers``) of the layers whose output rows are the units.
        reads: (consumer layer index, input :class:`~nestsynth.graph.ir.Slice`) for every
            read of the units: a chain's hidden layer h has one, layer h + 1 (expansion
            ``flat_size`` when it is the linear layer after the last conv stage).
        group: the graph group (None for a chain's hidden layer ``members[0]``).
    """

    members: tuple[int, ...]
    reads: tuple[tuple[int, Slice], ...]
    group: Group | None = None


def streams(model) -> list[Stream]:
    """The prunable unit streams of ``model``, in layer (graph) order.

    A SparseMLP / SparseCNN: one per hidden layer.  A SparseGraph: one per resizable group
    (:meth:`~nestsynth.graph.SparseGraph.groups`; the output stream and a stream summed
    with the network input are fixed by the data).
    """
    if isinstance(model, SparseGraph):
        return [Stream(tuple(member_indices(model, g)), tuple(group_reads(model, g)), g)
                for g in model.groups() if g.resizable]
    layers, out = model.layers, []
    for h in range(len(layers) - 1):
        flat = isinstance(layers[h], MaskedConv2d) and not isinstance(layers[h + 1], MaskedConv2d)
        read = Slice(f"layers.{h + 1}", (f"layers.{h}",), 0, layers[h].out_features, model.flat_size if flat else 1)
        out.append(Stream((h,), ((h + 1, read),)))
    return out


def _conv_connection_means(layer: MaskedConv2d, mean_map: torch.Tensor) -> torch.Tensor:
    """(units, k, k): the mean input that kernel entry (c, u, v) multiplies, over the output
    positions (zero padding included), from the reader's mean input map (units, H, W)."""
    k = layer.kernel_size
    cols = F.unfold(mean_map.unsqueeze(0), k, padding=layer.padding, stride=layer.stride)  # (1, units*k*k, L)
    return cols.mean(2).view(len(mean_map), k, k)


def mean_activations(model, X: torch.Tensor, chunk: int = 4096) -> list[torch.Tensor]:
    """Activation values a: the mean input that every weight reading a unit multiplies (eval mode).

    Args:
        model: a SparseMLP, SparseCNN or SparseGraph (mode restored afterwards).
        X: (P, ...) patterns.
        chunk: patterns per forward pass.

    Returns:
        One float64 tensor per read of every :func:`streams` entry (stream order, then read
        order), in the shape of the weights that read the units: ``(units * expansion,)``
        for a Linear reader (``(1/P) sum_p`` of its input column; an MLP's hidden layer h:
        ``(1/P) sum_p f_j(x_p)`` per neuron), ``(units, k, k)`` for a conv reader (the
        input of kernel entry (c, u, v) averaged over the patterns and the output positions).
    """
    was_training = model.training
    model.eval()
    n = max(len(X), 1)
    reads = [r for st in streams(model) for r in st.reads]
    (X,), stand_in = current().shard_or_stand_in(X)  # under torchrun: this rank's patterns, summed below
    sums: list[torch.Tensor | None] = [None] * len(reads)
    with torch.no_grad():
        for start in range(0, len(X), chunk):
            inputs, _ = model.trace(X[start:start + chunk])
            for r, (i, s) in enumerate(reads):
                x = inputs[i].index_select(1, s.indices().to(inputs[i].device)).double().sum(0)
                sums[r] = x if sums[r] is None else sums[r] + x
    model.train(was_training)
    means = [t / n for t in current().all_reduce_sum(sums, stand_in)]  # a rank without patterns adds zeros
    return [_conv_connection_means(model.layers[i], m) if isinstance(model.layers[i], MaskedConv2d) else m
            for (i, _), m in zip(reads, means)]


def significance(model, means: list[torch.Tensor], measure: str = "sigmoid") -> list[torch.Tensor]:
    """N2PS significance of every unit of every :func:`streams` entry.

    Args:
        model: a SparseMLP, SparseCNN or SparseGraph.
        means: :func:`mean_activations` of the model.
        measure: ``"sigmoid"``: ``S_j = sum sigma(a w)`` (the paper);
            ``"abs"``: ``S_j = sum |a w|``; sums over the live weights that read unit j
            (every read of its stream), ``a`` the mean input that weight multiplies.

    Returns:
        One float64 (units,) tensor per stream (an MLP: per hidden layer).
    """
    out, flat = [], iter(means)
    for st in streams(model):
        total = torch.zeros(model.layers[st.members[0]].out_features, dtype=torch.float64)
        for i, s in st.reads:
            layer = model.layers[i]
            idx = s.indices().to(layer.weight.device)
            w = layer.weight.detach().index_select(1, idx).double()  # (out, units*exp) or (out, units, k, k)
            live = layer.mask.index_select(1, idx) != 0
            z = w * next(flat).to(w.device).unsqueeze(0)  # a w, per connection
            term = torch.where(live, torch.sigmoid(z) if measure == "sigmoid" else z.abs(), torch.zeros_like(z))
            total += term.transpose(0, 1).reshape(s.units, -1).sum(1).cpu()  # unit-major columns
        out.append(total)
    return out


def insignificant(sig: torch.Tensor, threshold_scale: float = 1.0, min_neurons: int = 1) -> torch.Tensor:
    """Neurons to remove: ``S_j < threshold_scale * mean(S)``, at least ``min_neurons`` kept.

    When the rule would remove too many, only the least significant ones go (ties by
    position, the earlier neuron removed first).

    Returns:
        (n_h,) bool tensor, True = remove.
    """
    remove = sig < threshold_scale * sig.mean()
    most = len(sig) - min(min_neurons, len(sig))
    if int(remove.sum()) > most:  # keep the most significant min_neurons
        remove = torch.zeros_like(remove)
        remove[top_k(sig, most, largest=False)] = True
    return remove


def remove_stream_units(model, stream: Stream, keep: torch.Tensor) -> None:
    """Cut the units of ``stream`` where ``keep`` (bool) is False, everywhere they are produced and read.

    A chain's hidden layer: :func:`nestsynth.sparse.keep_units` (its rows, batch-norm
    entries and the next layer's columns); a graph group:
    :meth:`~nestsynth.graph.SparseGraph.remove_units` (every member, batch norm and read).
    No compensation (N2PS relies on retraining).
    """
    if bool(keep.all()):
        return
    if stream.group is None:
        keep_units(model, stream.members[0], keep.nonzero().squeeze(1))
    else:
        model.remove_units(current_group(model, stream.group), keep)


def prune_round(model, X: torch.Tensor, measure: str = "sigmoid", threshold_scale: float = 1.0,
                min_neurons: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One N2PS removal on every stream (hidden layer or coupled group), in place
    (significances from the same network, before any removal).

    Returns:
        (significances, removed): per :func:`streams` entry, the (units,) significances
        before the removal and the (units,) bool mask of removed units.
    """
    found = streams(model)
    sig = significance(model, mean_activations(model, X), measure)
    removed = [insignificant(s, threshold_scale, min_neurons) for s in sig]
    for st, rem in zip(found, removed):
        remove_stream_units(model, st, ~rem)
    return sig, removed


@register_method("n2ps", N2psConfig,
                 "N2PS (Augasta & Kathirvalavakumar 2011): remove hidden neurons (feature maps, coupled "
                 "channel groups) whose significance sum_k sigma(a_j w_kj) is below the layer average, "
                 "retrain, repeat")
def run_n2ps(ctx, mcfg: N2psConfig):
    """N2PS on the reference architecture (MLP, CNN or graph network); returns the pruned,
    retrained model."""
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
