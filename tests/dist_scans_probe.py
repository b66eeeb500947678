"""Run under torchrun by tests/test_distributed.py: every sharded scan against the same scan
computed whole in one process.

Each rank computes every score with the process group active (its part of the sample, summed
across ranks) and again alone on the whole sample (``distributed._CURRENT`` swapped for a
single-process Dist), and prints ``OK name`` when they agree (float32 sums in another order:
relative 1e-4) or ``BAD name ...``; the chosen units and weights of Policy 3 must be equal.

``--examples N`` takes the first N training examples as the scan sample (301 by default: the
ranks' parts differ by one); with fewer examples than ranks (1 for 2 ranks) the last ranks
get empty parts and must still enter every collective, contributing zeros.  A collective
waits at most ``--timeout`` seconds (60), so a rank that skips one fails the probe quickly
instead of after the run's 300 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from torch import nn

from nestsynth import distributed
from nestsynth.api import resolve_reference
from nestsynth.data import load_dataset
from nestsynth.graph.network import SparseGraph
from nestsynth.sparse import SparseMLP


@contextlib.contextmanager
def alone():
    saved = distributed._CURRENT
    distributed._CURRENT = distributed.Dist()
    try:
        yield
    finally:
        distributed._CURRENT = saved


def flat(value) -> list[torch.Tensor]:
    """Every tensor or number in a nested result, in order."""
    if isinstance(value, torch.Tensor):
        return [value.detach().double().cpu()]
    if isinstance(value, (int, float)):
        return [torch.tensor(float(value), dtype=torch.float64)]
    if isinstance(value, dict):  # Policy 3's "ratio" divides by a mean reduction near 0: compared via its parts
        return [t for k in sorted(value, key=str) if k != "ratio" for t in flat(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    if hasattr(value, "__dict__"):
        return flat(vars(value))
    return []


def check(name: str, fn) -> None:
    shared = flat(fn())
    with alone():
        whole = flat(fn())
    same = len(shared) == len(whole) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                                               for a, b in zip(shared, whole))
    worst = max((float((a - b).abs().max()) for a, b in zip(shared, whole) if a.shape == b.shape and a.numel()),
                default=0.0)
    print(f"{'OK' if same else 'BAD'} {name} (largest difference {worst:.2e})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=301)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.TIMEOUT_S = args.timeout
    dist = distributed.init_from_env("cpu")
    assert dist.active
    data = load_dataset("digits", val_fraction=0.2, split_seed=0)
    X, y = data.train.X[:args.examples], data.train.y[:args.examples]  # 301, odd: the ranks' parts differ by one
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    mlp = SparseMLP([64, 32, 16, 10], generator=gen())
    cnn = resolve_reference("tiny-cnn", data).build(gen())
    from nestsynth.seeds.cnn import make_cnn_seed

    sparse_cnn = make_cnn_seed(resolve_reference("tiny-cnn", data), 0.5, 0.3, gen())  # has dormant positions
    resnet = resolve_reference("resnet-mnist", data).build(gen())
    graph_mlp = SparseGraph.from_module(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                                        (1, 8, 8), gen())

    from nestsynth.baselines.n2ps import mean_activations
    from nestsynth.baselines.obs import layer_hessian
    from nestsynth.baselines.regularized import sensitivity
    from nestsynth.baselines.saliency import hessian_gradient, mean_gradient
    from nestsynth.growth.conv import dormant_topk
    from nestsynth.growth.feature_maps import grow_feature_maps
    from nestsynth.growth.groups import group_bridging_gradient, grow_group_maps, is_conv_group, is_linear_group
    from nestsynth.growth.scores import gradient_scan
    from nestsynth.pruning.area import area_scores
    from nestsynth.pruning.feature_maps import feature_map_statistics
    from nestsynth.pruning.groups import group_statistics
    from nestsynth.pruning.neurons import output_statistics
    from nestsynth.training import evaluate

    check("gradient_scan", lambda: gradient_scan(mlp, X, y, 64))
    check("gradient_scan_cnn", lambda: gradient_scan(cnn, X, y, 64, bridges=False))
    check("dormant_topk_cached", lambda: dormant_topk(sparse_cnn, X, y, 50, 64, cache=True))
    check("dormant_topk_uncached", lambda: dormant_topk(sparse_cnn, X, y, 50, 64, block_rows=8, cache=False))
    check("output_statistics", lambda: output_statistics(mlp, X, 64))
    check("evaluate", lambda: evaluate(mlp, X, y, 64))
    check("area_scores", lambda: area_scores(cnn, 0, X, 64))
    check("feature_map_statistics", lambda: feature_map_statistics(cnn, X, 64))
    for out_init in ("gradient", "random"):
        check(f"grow_feature_maps_{out_init}",
              lambda: grow_feature_maps(cnn, 0, 2, X, y, 3, 0.5, gen(), "layer", out_init))
    linear = next(g for g in graph_mlp.groups() if g.resizable and is_linear_group(graph_mlp, g))
    check("group_bridging_gradient", lambda: group_bridging_gradient(graph_mlp, linear, X, y, 64))
    check("group_statistics", lambda: group_statistics(resnet, X, 64))
    conv = next(g for g in resnet.groups() if g.resizable and is_conv_group(resnet, g))

    def grown():
        model = copy.deepcopy(resnet)
        stats = grow_group_maps(model, conv, 1, X, y, 2, None, gen(), "default", "gradient")
        return stats, model.state_dict()

    check("grow_group_maps", grown)
    check("mean_gradient", lambda: mean_gradient(mlp, X, y, 1.0, 100))
    check("hessian_gradient", lambda: hessian_gradient(mlp, X, y, 200.0, 0))
    check("layer_hessian", lambda: torch.from_numpy(layer_hessian(X.flatten(1))))
    check("layer_hessian_conv", lambda: torch.from_numpy(layer_hessian(X, layer=cnn.layers[0])))
    check("mean_activations", lambda: mean_activations(mlp, X.flatten(1), 64))
    check("sensitivity", lambda: sensitivity(mlp, X, y))
    check("sensitivity_cnn", lambda: sensitivity(cnn, X, y))
    distributed.shutdown()


if __name__ == "__main__":
    main()
