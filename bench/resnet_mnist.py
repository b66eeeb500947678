"""Benchmark: NeST vs gradual pruning on ResNet-8 / MNIST (a residual graph reference) at two sizes.

    python bench/resnet_mnist.py --data-dir ../shared/data/mnist [--sizes 4000,8000] [--epochs 30]
    python bench/resnet_mnist.py --smoke            # digits, 2 sizes, 4 epochs, one seed: a minute
    python bench/resnet_mnist.py --dataset digits --sizes 1500,3000 --epochs 30 --seeds 3

Runs ``nestsynth compare --model resnet-mnist --methods nest,gradual --sizes ... --epochs ...``
(every run at its size within the same epoch budget, NeST's growth included; finished runs
are reused, so an interrupted benchmark continues), then copies curves.md, curves.csv and
curves.png to bench/results/resnet_DATASET/ with the machine and the command line prepended.
ResNet-8 has 19,464 dense weights (8/16/32 channels, projection shortcuts into stages 2
and 3).  NeST's and gradual's settings are configs/resnet-mnist-sized.toml.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--sizes", default="4000,8000")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="digits, sizes 1500,3000, 4 epochs, one seed")
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "digits"],
                    help="digits: sklearn's 8x8 digits (minutes on CPU) instead of MNIST")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed on to compare (repeatable)")
    args = ap.parse_args()
    dataset, name = ("digits", "resnet_digits_smoke") if args.smoke else (args.dataset, f"resnet_{args.dataset}")
    sizes, epochs, seeds = ("1500,3000", 4, 1) if args.smoke else (args.sizes, args.epochs, args.seeds)
    out = Path(args.out or ROOT / "bench" / "runs" / name)
    results = Path(args.results or ROOT / "bench" / "results" / name)
    sets = [a for kv in args.set for a in ("--set", kv)]
    if args.smoke:
        sets += ["--set", "growth.score_samples=512", "--set", "growth.max_epochs=2",
                 "--set", "growth.map_candidates=2"]
    cmd = [sys.executable, "-m", "nestsynth.cli", "compare", "--config", str(ROOT / "configs" / "resnet-mnist-sized.toml"),
           "--model", "resnet-mnist", "--dataset", dataset,
           "--methods", "nest,gradual", "--sizes", sizes, "--epochs", str(epochs), "--seeds", str(seeds),
           "--jobs", str(args.jobs), "--threads", "1", "--device", "cpu", "--out", str(out), *sets,
           "--title", f"ResNet-8 on {dataset}: NeST vs gradual, {epochs} epochs per run, {seeds} seed(s)"]
    if dataset == "mnist":
        cmd[cmd.index("--dataset") + 2:cmd.index("--dataset") + 2] = ["--data-dir", args.data_dir]
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if not (out / "curves.md").is_file():
        return rc or 1
    sys.path.insert(0, str(ROOT / "bench"))
    from curves import copy_results

    copy_results(out, results, " ".join(sys.argv[1:]), time.monotonic() - t0, "curves", "resnet_mnist.py")
    return rc


if __name__ == "__main__":
    sys.exit(main())
