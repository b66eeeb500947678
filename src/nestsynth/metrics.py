"""Model size and cost: active weights, parameters, FLOPs and activation sparsity.

The FLOP convention of the NeST paper (Table 2) is owned by :func:`layer_flops`:
2 FLOPs per multiply-accumulate, biases and activations not counted, so the dense
LeNet-300-100 costs 2 x 266,200 = 532,400 FLOPs.  The activation-aware count
(paper Table 4) multiplies a layer's cost by the share of its inputs that are
non-zero; the network input is counted as dense, as in Table 4 (fc1 of the
7,032-weight model costs 14.1K FLOPs = 2 x 7,032).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOPS_PER_MAC = 2


def layer_flops(weights: int | float, input_density: float = 1.0) -> float:
    """FLOPs of one layer with ``weights`` active connections.

    Args:
        weights: active (non-zero) connections of the layer.
        input_density: share of the layer's inputs that are non-zero (1.0 = dense).

    Returns:
        2 x weights x input_density.
    """
    return FLOPS_PER_MAC * weights * input_density


def dense_flops(widths: Sequence[int]) -> int:
    """FLOPs of the dense MLP with these layer widths (in, hidden..., out)."""
    return int(sum(layer_flops(a * b) for a, b in zip(widths[:-1], widths[1:])))


@torch.no_grad()
def activation_density(model, X: torch.Tensor, batch_size: int = 2048) -> list[float]:
    """Mean share of non-zero outputs of every layer per inference (paper's Act%).

    Args:
        model: a SparseMLP.
        X: inputs, shape (N, *input_shape).

    Returns:
        One fraction per layer (hidden layers after their activation; the output
        layer's logits, normally 1.0).
    """
    was_training = model.training
    model.eval()
    nonzero = None
    for start in range(0, len(X), batch_size):
        outs = model.layer_outputs(X[start:start + batch_size])
        counts = [float((o != 0).float().mean(dim=1).sum()) for o in outs]
        nonzero = counts if nonzero is None else [a + b for a, b in zip(nonzero, counts)]
    model.train(was_training)
    return [c / len(X) for c in nonzero]


def layer_table(model, act: list[float] | None = None) -> list[dict]:
    """Per-layer metrics: name, in, out, weights, flops, flops_act, act_pct, parameters.

    ``flops_act`` discounts zero inputs using the previous layer's activation density
    (``act``); without ``act`` it equals ``flops``.
    """
    rows = []
    for i, layer in enumerate(model.layers):
        w = layer.active_weights()
        in_density = 1.0 if (act is None or i == 0) else act[i - 1]
        rows.append({
            "name": f"fc{i + 1}",
            "in": layer.in_features,
            "out": layer.out_features,
            "weights": w,
            "parameters": w + model.nonzero_biases(i),
            "flops": layer_flops(w),
            "flops_act": layer_flops(w, in_density),
            "act_pct": None if act is None else 100.0 * act[i],
        })
    return rows


def totals(rows: list[dict]) -> dict:
    """Sum weights, parameters and FLOPs over the rows of :func:`layer_table`."""
    return {k: sum(r[k] for r in rows) for k in ("weights", "parameters", "flops", "flops_act")}
