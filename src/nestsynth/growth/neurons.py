"""Neuron growth, Policy 2 / Algorithm 1: a new neuron bridges the most correlated pairs.

Sign convention (a documented deviation): Algorithm 1 as printed sets
``w_in[n] += dw * sgn(G[m, n])`` with ``w_out[m] += dw``, which makes the bridged
path change u_m by +|G| x_n * sgn(G) -- the direction that *raises* the loss.  The
text says the initialisation imitates a back-propagation update on the bridging
connection (Eq. 2-6), i.e. a change of -eta * G.  ``sign="descent"`` (the default)
therefore uses ``w_in[n] += -dw * sgn(G[m, n])``; ``sign="paper"`` reproduces the
printed pseudo-code.
"""

from __future__ import annotations

import math

import torch

from ..select import top_k


def _avg_abs_nonzero(t: torch.Tensor) -> float:
    nz = t[t != 0]
    return float(nz.abs().mean()) if nz.numel() else 0.0


def bridge_neuron(G: torch.Tensor, beta: float, alpha: float, w_in_ref: torch.Tensor,
                  w_out_ref: torch.Tensor, generator: torch.Generator,
                  exclude: torch.Tensor | None = None, sign: str = "descent"):
    """Algorithm 1 for one new neuron.

    Args:
        G: (M, N) bridging gradient, M = neurons after the layer, N = before it.
        beta: growth ratio; the top ceil(beta*M*N) entries of |G| are bridged.
        alpha: birth strength (Eq. 7).
        w_in_ref: weights of the layer's incoming matrix W^l (avg of |non-zero|).
        w_out_ref: weights of the outgoing matrix W^{l+1}.
        generator: RNG for the shared random signs.
        exclude: (M, N) bool, pairs not to bridge (already bridged this step).
        sign: "descent" or "paper" (see module docstring).

    Returns:
        (w_in (N,), w_out (M,), pairs (M, N) bool of the bridged pairs).
    """
    M, N = G.shape
    scores = G.abs()
    if exclude is not None:
        scores = scores.masked_fill(exclude, 0.0)
    k = min(max(1, math.ceil(beta * M * N)), int((scores > 0).sum()))
    pairs = torch.zeros(M * N, dtype=torch.bool, device=G.device)
    w_in, w_out = torch.zeros(N, device=G.device), torch.zeros(M, device=G.device)
    if k == 0:
        return w_in, w_out, pairs.view(M, N)
    idx = top_k(scores, k)
    pairs[idx] = True
    m, n = idx // N, idx % N
    g = G.flatten()[idx]
    rand_sign = torch.randint(0, 2, (k,), generator=generator).to(G.device) * 2.0 - 1.0
    dw = g.abs().sqrt() * rand_sign  # square-root rule, Eq. 3
    in_sign = -torch.sign(g) if sign == "descent" else torch.sign(g)
    w_out.index_add_(0, m, dw)
    w_in.index_add_(0, n, dw * in_sign)
    w_out *= _scale(alpha, w_out_ref, w_out)  # birth strength, Eq. 7
    w_in *= _scale(alpha, w_in_ref, w_in)
    return w_in, w_out, pairs.view(M, N)


def _scale(alpha: float, ref: torch.Tensor, new: torch.Tensor) -> float:
    own = _avg_abs_nonzero(new)
    return alpha * _avg_abs_nonzero(ref) / own if own > 0 else 0.0


def grow_neurons(G: torch.Tensor, count: int, beta: float, alpha: float,
                 w_in_ref: torch.Tensor, w_out_ref: torch.Tensor, generator: torch.Generator,
                 sign: str = "descent") -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` new neurons for one hidden layer from one bridging gradient.

    Successive neurons bridge successive blocks of the |G| ranking: pairs bridged by
    an earlier neuron of the same step are excluded, approximating a recomputation of
    G after each birth (a documented choice; the paper adds one neuron per call).

    Returns:
        (w_in (count, N), w_out (M, count)); neurons with nothing to bridge are dropped.
    """
    taken = torch.zeros_like(G, dtype=torch.bool)
    ins, outs = [], []
    for _ in range(count):
        w_in, w_out, pairs = bridge_neuron(G, beta, alpha, w_in_ref, w_out_ref, generator, taken, sign)
        if not pairs.any():
            break
        taken |= pairs
        ins.append(w_in)
        outs.append(w_out)
    if not ins:
        return G.new_zeros(0, G.shape[1]), G.new_zeros(G.shape[0], 0)
    return torch.stack(ins), torch.stack(outs, dim=1)
