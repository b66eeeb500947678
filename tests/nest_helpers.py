"""Helpers shared by the test modules: small random sparse models."""

from __future__ import annotations

import torch


def random_mask(out_f: int, in_f: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A 0/1 float mask with every row and column non-empty."""
    m = (torch.rand(out_f, in_f, generator=gen) < density).float()
    m[torch.arange(out_f), torch.randint(in_f, (out_f,), generator=gen)] = 1
    m[torch.randint(out_f, (in_f,), generator=gen), torch.arange(in_f)] = 1
    return m


def sparse_model(widths=(6, 5, 4, 3), density=0.5, seed=0, batch_norm=False, activations="relu"):
    """A SparseMLP with random masks, dormant weights zero, random BN statistics."""
    from nestsynth.sparse import SparseMLP

    gen = torch.Generator().manual_seed(seed)
    model = SparseMLP(list(widths), activations, batch_norm=batch_norm, generator=gen)
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_(random_mask(layer.out_features, layer.in_features, density, gen))
            layer.bias.uniform_(-0.5, 0.5, generator=gen)
        model.zero_dormant()
        for bn in model.norms:
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.5, 0.5, generator=gen)
    return model
