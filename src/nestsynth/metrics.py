"""Model size and cost: active weights, parameters, FLOPs and activation sparsity.

The FLOP convention of the NeST paper (Table 2, Tables 4(b), 5, 6) is owned by
:func:`layer_flops`: 2 FLOPs per multiply-accumulate (MAC), biases, activations,
batch norm and pooling not counted, so the dense LeNet-300-100 costs
2 x 266,200 = 532,400 FLOPs and the dense LeNet-5 2 x 2,293,000 = 4,586,000.

Convolutions (:func:`conv_macs`, :func:`conv_flops`): kernel ``n`` of a
:class:`MaskedConv2d` costs (its non-zero kernel weights) x (the output positions it
still computes, ``area[n].sum()``) MACs, so partial-area convolution (Algorithm 2)
reduces the count; with a full area mask this is the usual
active weights x H_out x W_out.  Positions that read the zero padding are counted, as
in the published dense counts (VGG-16 = 30.94e9 FLOPs).

Activation-aware FLOPs (paper Tables 4-6) multiply a layer's cost by the share of its
inputs that are non-zero: the density of the previous layer's output after its
activation and pooling (what the layer actually reads; :func:`activation_density`).
The network input is counted as dense, as in Table 4 (fc1 of the 7,032-weight model
costs 14.1K FLOPs = 2 x 7,032).  For a conv layer the input density is the mean over
channels and positions of its input feature maps.  This is an approximation: a MAC is
skipped exactly when the input value it reads is zero, so the exact count needs the
joint pattern of input zeros, kernel masks and area masks (and per-sample positions);
the mean density treats the input zeros as independent of which kernel weights and
output positions are active.  For fc layers it is the same approximation the MLP count
always made (input zeros independent of which connections are active).

Reference counts: :func:`dense_flops` takes MLP widths; :func:`reference_flops` (and
:func:`reference_weights`) take a registered spec (``ModelSpec``/``CNNSpec``, via its
own ``dense_flops``) or a ``SparseMLP``/``SparseCNN``, counted as if every mask were
full and every weight non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sparse.conv import MaskedConv2d

FLOPS_PER_MAC = 2


def layer_flops(weights: int | float, input_density: float = 1.0) -> float:
    """FLOPs of one layer with ``weights`` active connections (MACs per inference).

    Args:
        weights: active (non-zero) connections of the layer; for a convolution, the
            MACs per inference (see :func:`conv_macs`).
        input_density: share of the layer's inputs that are non-zero (1.0 = dense).

    Returns:
        2 x weights x input_density.
    """
    return FLOPS_PER_MAC * weights * input_density


def dense_flops(widths: Sequence[int]) -> int:
    """FLOPs of the dense MLP with these layer widths (in, hidden..., out); MLPs only,
    see :func:`reference_flops` for CNNs."""
    return int(sum(layer_flops(a * b) for a, b in zip(widths[:-1], widths[1:])))


def kernel_positions(layer: MaskedConv2d) -> torch.Tensor:
    """(out,) output positions each kernel computes (its partial area, paper's Conv%): what
    one inference spends on each of its active weights."""
    return layer.area.detach().flatten(1).ne(0).sum(dim=1)


def conv_macs(layer: MaskedConv2d) -> int:
    """MACs of one inference of a masked convolution, partial areas included.

    Args:
        layer: a MaskedConv2d with weight/mask (out, in, k, k) and area (out, H_out, W_out).

    Returns:
        sum over output channels n of (non-zero kernel weights of n) x area[n].sum().
    """
    w = layer.weight.detach() * layer.mask                           # (out, in, k, k)
    per_kernel = torch.count_nonzero(w.flatten(1), dim=1)            # (out,) active weights of kernel n
    positions = kernel_positions(layer)                              # (out,) positions kernel n computes
    return int((per_kernel.long() * positions.long()).sum())


def conv_flops(layer: MaskedConv2d, input_density: float = 1.0) -> float:
    """FLOPs of a masked convolution: :func:`layer_flops` of its :func:`conv_macs`.

    Args:
        layer: a MaskedConv2d.
        input_density: mean share of non-zero input values (over channels and positions).

    Returns:
        2 x conv_macs(layer) x input_density.
    """
    return layer_flops(conv_macs(layer), input_density)


def weight_layer_flops(layer, input_density: float = 1.0) -> float:
    """FLOPs of a MaskedLinear (2 x active weights) or MaskedConv2d (:func:`conv_flops`).

    Args:
        layer: a MaskedLinear or MaskedConv2d.
        input_density: share of the layer's inputs that are non-zero.

    Returns:
        The layer's FLOPs per inference times ``input_density``.
    """
    if isinstance(layer, MaskedConv2d):
        return conv_flops(layer, input_density)
    return layer_flops(layer.active_weights(), input_density)


def _dense_layer_weights(layer) -> int:
    """Weights of the layer with every mask full: out*in*k*k (conv) or out*in (fc)."""
    return int(layer.weight.numel())


def _dense_layer_macs(layer) -> int:
    """MACs of the layer with every mask full: weights x H_out x W_out for a conv."""
    if isinstance(layer, MaskedConv2d):
        h, w = layer.out_hw
        return _dense_layer_weights(layer) * h * w
    return _dense_layer_weights(layer)


def reference_flops(ref) -> int:
    """Dense FLOPs of a reference architecture or of a model with every mask full.

    Args:
        ref: a SparseMLP or SparseCNN (anything with ``layers`` of MaskedLinear /
            MaskedConv2d: every weight and area mask counted as full), a registered spec
            (``ModelSpec`` or ``CNNSpec``: its ``dense_flops()``), or MLP widths.

    Returns:
        2 x dense MACs (biases, activations and pooling not counted).

    Raises:
        TypeError: ``ref`` is none of these.
    """
    if hasattr(ref, "layers"):
        return int(sum(layer_flops(_dense_layer_macs(layer)) for layer in ref.layers))
    if callable(getattr(ref, "dense_flops", None)):
        return int(ref.dense_flops())
    if isinstance(ref, Sequence) and all(isinstance(v, int) for v in ref):
        return dense_flops(ref)
    raise TypeError(f"reference_flops needs a model, a registered spec or MLP widths, not {type(ref).__name__}.")


def reference_weights(ref) -> int:
    """Dense weights of a reference (same arguments as :func:`reference_flops`).

    Raises:
        TypeError: ``ref`` is not a model, a spec or MLP widths.
    """
    if hasattr(ref, "layers"):
        return sum(_dense_layer_weights(layer) for layer in ref.layers)
    if callable(getattr(ref, "dense_weights", None)):
        return int(ref.dense_weights())
    if isinstance(ref, Sequence) and all(isinstance(v, int) for v in ref):
        return sum(a * b for a, b in zip(ref[:-1], ref[1:]))
    raise TypeError(f"reference_weights needs a model, a registered spec or MLP widths, not {type(ref).__name__}.")


@torch.no_grad()
def activation_density(model, X: torch.Tensor, batch_size: int = 2048) -> list[float]:
    """Mean share of non-zero outputs of every layer per inference (paper's Act%).

    Args:
        model: a SparseMLP, SparseCNN or SparseGraph (evaluated in eval mode, then restored).
        X: inputs, shape (N, *input_shape).
        batch_size: inputs per forward pass.

    Returns:
        One fraction per layer: hidden layers after batch norm, activation and (conv)
        pooling, i.e. the input the next layer sees, the share taken over channels and
        positions for feature maps (B, C, H, W); the output layer's logits (normally 1.0).
        For a graph network entry i is the density of ``layers[i + 1]``'s input (its
        ``layer_outputs``), the last entry the last layer's output.
    """
    was_training = model.training
    model.eval()
    nonzero = None
    for start in range(0, len(X), batch_size):
        outs = model.layer_outputs(X[start:start + batch_size])  # (B, features) or (B, C, H, W)
        counts = [float((o.flatten(1) != 0).float().mean(dim=1).sum()) for o in outs]
        nonzero = counts if nonzero is None else [a + b for a, b in zip(nonzero, counts)]
    model.train(was_training)
    return [c / len(X) for c in nonzero]


def _layer_names(model) -> list[str]:
    """The model's own ``layer_names`` when it has them (a graph network's module paths), else
    conv1..convK for the MaskedConv2d layers, then fc1..fcM."""
    if hasattr(model, "layer_names"):
        return list(model.layer_names)
    names, n_conv = [], 0
    for i, layer in enumerate(model.layers):
        if isinstance(layer, MaskedConv2d):
            n_conv += 1
            names.append(f"conv{n_conv}")
        else:
            names.append(f"fc{i - n_conv + 1}")
    return names


def layer_table(model, act: list[float] | None = None) -> list[dict]:
    """Per-layer metrics of a SparseMLP, SparseCNN or SparseGraph.

    Args:
        model: a SparseMLP, SparseCNN or :class:`~nestsynth.graph.SparseGraph`.
        act: per-layer activation density from :func:`activation_density` (optional);
            ``act[i]`` is the density of what ``layers[i + 1]`` reads, which for a graph
            network is that layer's own input.

    Returns:
        One dict per weight layer with ``name`` (conv1.., then fc1..; a graph network's
        module paths), ``in``/``out``
        (channels for conv, features for fc), ``weights`` (non-zero weights),
        ``parameters`` (weights + non-zero folded biases), ``flops`` (dense input),
        ``flops_act`` (times the previous layer's density ``act[i-1]``; the first layer's
        input is dense; without ``act`` equal to ``flops``), ``act_pct`` (100 x act[i] or
        None) and ``conv_pct`` (percent of the output area still computed; None for fc
        layers).  Conv rows also have ``kernel`` (k) and ``out_hw`` ([H_out, W_out]).
    """
    rows = []
    for i, (name, layer) in enumerate(zip(_layer_names(model), model.layers)):
        w = layer.active_weights()
        in_density = 1.0 if (act is None or i == 0) else act[i - 1]
        row = {
            "name": name,
            "in": layer.in_features,
            "out": layer.out_features,
            "weights": w,
            "parameters": w + model.nonzero_biases(i),
            "flops": weight_layer_flops(layer),
            "flops_act": weight_layer_flops(layer, in_density),
            "act_pct": None if act is None else 100.0 * act[i],
            "conv_pct": None,
        }
        if isinstance(layer, MaskedConv2d):
            row.update(conv_pct=layer.conv_pct(), kernel=layer.kernel_size, out_hw=list(layer.out_hw))
        rows.append(row)
    return rows


def totals(rows: list[dict]) -> dict:
    """Sum weights, parameters and FLOPs over the rows of :func:`layer_table`."""
    return {k: sum(r[k] for r in rows) for k in ("weights", "parameters", "flops", "flops_act")}
