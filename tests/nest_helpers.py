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
    randomize_bn(model, gen, 0.5, 0.5)
    return model


def randomize_bn(model, gen: torch.Generator, spread: float = 0.3, bias: float | None = 0.2) -> None:
    """Random batch-norm statistics and affine parameters: running mean in +-spread, running
    variance in [0.5, 2], weight in [0.5, 1.5], bias in +-bias (left alone when None)."""
    with torch.no_grad():
        for bn in model.norms:
            bn.running_mean.uniform_(-spread, spread, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            if bias is not None:
                bn.bias.uniform_(-bias, bias, generator=gen)


def randomize_masks(model, gen: torch.Generator, density: float, area: float | None = None) -> None:
    """Every layer's mask (and conv area mask, with ``area``) ~ Bernoulli(density / area),
    drawn layer by layer in the mask's dtype; dormant weights zeroed."""
    with torch.no_grad():
        for layer in model.layers:
            dtype = layer.mask.dtype
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen, dtype=dtype) < density).to(dtype))
            if area is not None and hasattr(layer, "area"):
                layer.area.copy_((torch.rand(layer.area.shape, generator=gen, dtype=dtype) < area).to(dtype))
        model.zero_dormant()


def interrupt_after(n: int):
    """An ``on_iteration`` callback that raises KeyboardInterrupt at its n-th call (a run
    stopped after n checkpoints)."""
    calls = []

    def interrupt(state) -> None:
        calls.append(state.phase)
        if len(calls) == n:
            raise KeyboardInterrupt

    return interrupt


def mlp_context(cfg, data, widths):
    """The run context of an MLP reference of ``widths`` (ReLU, no batch norm) on the CPU."""
    from nestsynth.registry import ModelSpec
    from nestsynth.run_context import RunContext

    return RunContext(cfg, data, ModelSpec("mlp", tuple(widths)), device=torch.device("cpu"))
