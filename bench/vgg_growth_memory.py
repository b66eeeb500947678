"""Benchmark: time and peak memory of growth scoring on the VGG-16 seed (CPU).

    python bench/vgg_growth_memory.py [--threads 1] [--batch 8]

Builds the paper's VGG-16 seed (registry ``vgg-16``, widths (3, *seed_hidden, 1000):
r = 0.75 conv maps, 3200-1600-1000 neurons, batch norm) with a random 30% of the
connections of every layer active (``torch.rand < 0.3`` per layer), and a random
224x224 batch, then measures, each in its own subprocess (so peak memory is per
measurement):

* ``train``: one ordinary training step (forward + backward + Adam step, train mode);
* ``scan_only``: the part every gradient score shares: one eval-mode forward
  (``model.trace``) and the backward pass to every layer's output delta
  (``growth.conv.scan_batch`` with a callback that does nothing);
* ``grow_topk_idx``: connection-growth scoring with ``growth.conv.dormant_topk``
  (k = 1% of all possible connections, one global ranking; linear layers scored in
  blocks of ``--block-rows`` rows): the selected values and flat indices only;
* ``grow_topk``: the same through ``growth.conv.top_dormant``, which also returns the
  new masks (one copy of every mask, ~300 MB here);
* ``grow_dense``: the same selection from full dense score matrices
  (``layer_gradients`` + ``grow_connections_global``);
* ``prune``: a pruning-style step: effective-weight magnitudes |W*| of every layer and
  the 1% smallest live ones per layer (``pruning.magnitude.prune_smallest``);
* ``nest_grow``: one growth action of the real synthesis loop (``Synthesis._grow``:
  blocked global connection growth with 3% of the possible connections, bridging
  gradients and 8 new neurons per hidden linear layer, one new feature map per conv
  layer chosen from 4 random candidates) on the VGG-16 seed built by the loop itself
  (``seed_net.density = 0.3``), with the random batch as its training data;
* ``nest_prune``: one pruning action of the loop (``Synthesis._prune``: 1% of every
  layer's connections by effective weight, partial-area convolution at 1% of every conv
  layer's positions, feature-map and neuron statistics and removal).

Peak memory: the process's peak RSS during the step minus its RSS after building the
model and the data.  The peak is read as ``VmHWM`` after resetting it
(``/proc/self/clear_refs``) once the model is built; ``ru_maxrss`` (never reset) is
reported too (``peak_ru_mb`` = ru_maxrss after the step minus the baseline RSS; it
equals ``peak_mb`` unless building the model peaked higher than the step).  Writes
bench/results/vgg_growth_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("train", "scan_only", "grow_topk_idx", "grow_topk", "grow_dense", "prune", "nest_grow", "nest_prune")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build(batch: int, density: float, seed: int = 0):
    """The VGG-16 seed with random masks of the given density, and a random batch."""
    import torch

    from nestsynth.registry import get_model

    spec = get_model("vgg-16")
    gen = torch.Generator().manual_seed(seed)
    model = spec.build(gen, widths=(3, *spec.seed_hidden, 1000))
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_(torch.rand(layer.mask.shape, generator=gen) < density)
        model.zero_dormant()
    X = torch.randn(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    return model, X, y


def build_synthesis(batch: int, density: float, seed: int = 0):
    """The synthesis loop on the VGG-16 seed with a random batch as its data."""
    import torch

    from nestsynth.config import from_dict
    from nestsynth.data import DataBundle, Dataset
    from nestsynth.registry import get_model
    from nestsynth.synthesis import Synthesis

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    data = DataBundle("random", Dataset(X, y), Dataset(X, y), None, (3, 224, 224), 1000)
    cfg = from_dict({"model": "vgg-16", "device": "cpu", "seed_net": {"density": density},
                     "growth": {"connection_fraction": 0.03, "neurons_per_step": 8, "feature_maps_per_step": 1,
                                "map_candidates": 4, "beta": 0.02},
                     "pruning": {"rate": 0.01, "area_rate": 0.01}})
    return Synthesis(cfg, data, get_model("vgg-16"), None)


def step(name: str, model, X, y, block_rows: int) -> dict:
    """Run one measured step; returns extra facts about it."""
    import torch
    import torch.nn.functional as F

    from nestsynth.growth.connections import grow_connections_global
    from nestsynth.growth.conv import dormant_topk, scan_batch, layer_gradients, top_dormant
    from nestsynth.pruning.magnitude import effective_scores, prune_smallest

    if name == "nest_grow":
        before = model.model.active_weights()
        info = model._grow()
        return {"grown": info, "weights_before": before, "weights_after": model.model.active_weights(),
                "widths_after": model.model.widths}
    if name == "nest_prune":
        before = model.model.active_weights()
        removed, units = model._prune()
        return {"removed_connections": removed, "removed_units": units, "removed_area": model.area_removed,
                "weights_before": before, "weights_after": model.model.active_weights()}
    possible = sum(layer.weight.numel() for layer in model.layers)
    k = int(round(0.01 * possible))
    if name == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(loss)}
    if name == "scan_only":
        model.eval()
        sizes = {}
        scan_batch(model, X, y, len(X), list(range(len(model.layers))),
                   lambda i, x, d: sizes.__setitem__(i, d.numel()))
        return {"delta_mb": sum(sizes.values()) * 4 / 2 ** 20}
    if name == "grow_topk_idx":
        values, idx = dormant_topk(model, X, y, k, batch_size=len(X), block_rows=block_rows)
        return {"k": k, "added": int(idx.numel()), "min_selected_score": float(values[-1])}
    if name == "grow_topk":
        masks = top_dormant(model, X, y, k, batch_size=len(X), block_rows=block_rows)
    elif name == "grow_dense":
        grads = layer_gradients(model, X, y, batch_size=len(X))
        scores = [g.abs_() for g in grads]
        masks = grow_connections_global(scores, [layer.mask for layer in model.layers], k)
        del grads, scores
    elif name == "prune":
        masks = []
        for i, layer in enumerate(model.layers):
            n = int(round(0.01 * layer.active_connections()))
            masks.append(prune_smallest(effective_scores(model, i), layer.mask, n))
        return {"removed": int(sum(int(layer.mask.sum() - m.sum()) for layer, m in zip(model.layers, masks)))}
    else:
        raise SystemExit(f"unknown measurement {name!r}")
    added = sum(int(m.sum() - layer.mask.sum()) for layer, m in zip(model.layers, masks))
    per_layer = [int(m.sum() - layer.mask.sum()) for layer, m in zip(model.layers, masks)]
    return {"k": k, "added": added, "added_per_layer": per_layer}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.measure.startswith("nest_"):
        model, X, y = build_synthesis(args.batch, args.density), None, None
    else:
        model, X, y = build(args.batch, args.density)
    base_kb = _status_kb("VmRSS")
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    load = os.getloadavg()
    t0 = time.perf_counter()
    info = step(args.measure, model, X, y, args.block_rows)
    seconds = time.perf_counter() - t0
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _status_kb("VmHWM")
    out = {"measure": args.measure, "seconds": seconds, "base_rss_mb": base_kb / 1024,
           "peak_mb": ((hwm if reset else ru_after) - base_kb) / 1024,
           "peak_ru_mb": (ru_after - base_kb) / 1024, "ru_maxrss_before_mb": ru_before / 1024,
           "peak_source": "VmHWM after reset" if reset else "ru_maxrss",
           "load_before": load, "load_after": os.getloadavg(), **info}
    print("RESULT " + json.dumps(out))


def model_facts(density: float) -> dict:
    from nestsynth.registry import get_model

    spec = get_model("vgg-16")
    widths = (3, *spec.seed_hidden, 1000)
    shapes = spec.with_widths(widths).layer_shapes()
    possible = sum(r["weights"] for r in shapes)
    return {"widths": list(widths), "possible_connections": possible, "density": density,
            "model_weights_mb": possible * 4 / 2 ** 20,
            "largest_layer": max(((r["out"], r["in"]) for r in shapes if r["kind"] == "fc"),
                                 key=lambda t: t[0] * t[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=MEASURES, help="(internal) run one measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--block-rows", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vgg_growth_memory.json"))
    parser.add_argument("--only", help="comma-separated measurements to (re)run; the others are kept from --out")
    args = parser.parse_args()
    if args.measure:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    wanted = [m.strip() for m in args.only.split(",")] if args.only else list(MEASURES)
    kept = {}
    if args.only and Path(args.out).is_file():
        kept = {r["measure"]: r for r in json.loads(Path(args.out).read_text())["results"]}
    results = []
    for name in MEASURES:
        if name not in wanted:
            if name in kept:
                results.append(kept[name])
            continue
        cmd = [sys.executable, __file__, "--measure", name, "--threads", str(args.threads),
               "--batch", str(args.batch), "--density", str(args.density), "--block-rows", str(args.block_rows)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"{name:<11} {r['seconds']:8.2f} s  peak +{r['peak_mb']:8.1f} MB  (base {r['base_rss_mb']:.0f} MB, "
              f"load {r['load_before'][0]:.2f})", flush=True)
    report = {"model": "vgg-16 seed", **model_facts(args.density), "batch": args.batch, "threads": args.threads,
              "block_rows": args.block_rows, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "python": platform.python_version(), "results": results}
    print(f"\n{'step':<11} {'seconds':>8} {'peak MB':>9} {'ru MB':>9}")
    for r in results:
        print(f"{r['measure']:<11} {r['seconds']:8.2f} {r['peak_mb']:9.1f} {r['peak_ru_mb']:9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
