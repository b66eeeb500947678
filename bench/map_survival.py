"""How many grown feature maps are still alive after growth (LeNet-5 runs).

    python bench/map_survival.py --data-dir ../shared/data/mnist RUN [RUN ...]

For each run directory, loads ``checkpoints/post_growth.pt`` and measures every conv
map's mean |output| on 2,048 training images; a map counts as kept when it is at least
the pruning threshold (``pruning.neuron_threshold`` x the layer mean, the criterion the
next pruning step applies), as zero when its output is exactly 0 (a dead ReLU).  Maps
beyond the seed's widths are the grown ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nestsynth import config as C
from nestsynth.data import load_dataset
from nestsynth.pruning import feature_map_statistics
from nestsynth.report import load_model


def survival(run: Path, X: torch.Tensor) -> dict:
    cfg = C.load(run / "config.toml")
    model = load_model(run / "checkpoints" / "post_growth.pt").eval()
    seed_widths = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["neurons"]  # the seed row
    stats = feature_map_statistics(model, X, 1024)
    out = {}
    for h in range(model.n_conv):
        a = stats.abs_means[h]
        t = cfg.pruning.neuron_threshold * float(a.mean())
        grown, seed = a[seed_widths[h]:], a[:seed_widths[h]]
        out[f"conv{h + 1}"] = {"grown": grown.numel(), "grown_kept": int((grown >= t).sum()),
                               "grown_zero": int((grown == 0).sum()), "seed": seed.numel(),
                               "seed_kept": int((seed >= t).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    X = load_dataset("mnist", args.data_dir, val_fraction=0.0833333).train.X[:2048]
    for run in args.runs:
        s = survival(Path(run), X)
        print(run + ": " + "; ".join(f"{k} grown kept {v['grown_kept']}/{v['grown']} (zero {v['grown_zero']}), "
                                     f"seed kept {v['seed_kept']}/{v['seed']}" for k, v in s.items()))


if __name__ == "__main__":
    main()
