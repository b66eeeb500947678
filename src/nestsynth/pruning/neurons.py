"""Policy 4 on neurons: remove weak or disconnected neurons."""

from __future__ import annotations

import torch


def neurons_to_keep(out_abs: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """Which neurons of a hidden layer survive.

    A neuron is removed when its mean output magnitude over the data is below
    ``threshold`` x the layer's mean (a relative threshold, so one value works for any
    activation scale), when it has no input connection, or when it has no output
    connection.  At least one neuron (the strongest) always survives.

    Args:
        out_abs: (H,) mean |output| of each neuron.
        in_mask: (H, N) mask of the incoming layer.
        out_mask: (M, H) mask of the outgoing layer.
        threshold: relative threshold, >= 0.

    Returns:
        (H,) bool, True = keep.
    """
    keep = (out_abs >= threshold * out_abs.mean()) & (out_abs > 0) if threshold > 0 else out_abs >= 0
    keep &= in_mask.bool().any(dim=1) & out_mask.bool().any(dim=0)
    if not keep.any():
        keep[int(torch.argmax(out_abs))] = True
    return keep


@torch.no_grad()
def output_statistics(model, X: torch.Tensor, batch_size: int = 2048):
    """Mean |x| and mean x of every hidden neuron's output over X (eval mode).

    Returns:
        (abs_means, means): lists with one (width_h,) tensor per hidden layer.
    """
    from ..distributed import current

    was_training = model.training
    model.eval()
    n = max(len(X), 1)
    dist = current()
    X = dist.shard(X)[0]  # under torchrun: this rank's part, the sums are summed across ranks
    abs_sum = [torch.zeros(l.out_features, device=X.device) for l in model.layers[:-1]]
    sums = [torch.zeros_like(t) for t in abs_sum]
    for start in range(0, len(X), batch_size):
        hidden = model.layer_outputs(X[start:start + batch_size])[:-1]  # (B, width_h) each
        for h, act in enumerate(hidden):
            abs_sum[h] += act.abs().sum(0)
            sums[h] += act.sum(0)
    model.train(was_training)
    dist.all_reduce_sum(abs_sum + sums)  # before any threshold
    return [t / n for t in abs_sum], [t / n for t in sums]


def remove_neurons(model, h: int, keep: torch.Tensor, out_mean: torch.Tensor, optimizer=None) -> int:
    """Remove the neurons of hidden layer h where ``keep`` is False.

    A removed neuron's mean output is folded into the next layer's bias (before that
    layer's batch norm, like any other input), which is exact for a neuron without
    inputs (constant output) and the least-squares choice for a weak one.

    Returns:
        How many neurons were removed.
    """
    from ..sparse import keep_units

    removed = ~keep
    if not removed.any():
        return 0
    nxt = model.layers[h + 1]
    with torch.no_grad():
        shift = (nxt.weight * nxt.mask)[:, removed] @ out_mean[removed]  # (M,)
        nxt.bias += shift
    keep_units(model, h, keep.nonzero().flatten(), optimizer)
    return int(removed.sum())
