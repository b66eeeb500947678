"""Benchmark: NeST vs gradual pruning on ResNet-8 / MNIST (a residual graph reference) at two sizes.

    python bench/resnet_mnist.py --data-dir ../shared/data/mnist [--sizes 4000,8000] [--epochs 30]
    python bench/resnet_mnist.py --smoke            # digits, 2 sizes, 4 epochs, one seed: minutes

Runs ``nestsynth compare --model resnet-mnist --methods nest,gradual --sizes ... --epochs ...``
(every run at its size within the same epoch budget, NeST's growth included; finished runs
are reused, so an interrupted benchmark continues), then copies curves.md, curves.csv and
curves.png to bench/results/resnet_mnist/ with the machine and the command line prepended.
ResNet-8 has 19,464 dense weights (8/16/32 channels, projection shortcuts into stages 2
and 3).  NeST's settings (below, as ``--set`` overrides) follow the LeNet-5 sized config:
a seed with half of every resizable group's channels and 10% of the connections, short
growth iterations (feature maps by Policy 3 in every coupled group: a residual stream
grows in all its members at once), then a cubic size schedule with one global ranking of
|W*| and partial-area convolution.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEST = {"seed_net.ratio": 0.5, "seed_net.density": 0.1, "train.lr": 0.002, "train.batch_size": 128,
        "dense.train": "false", "growth.target": '"0.01"', "growth.max_iterations": 10, "growth.max_epochs": 8,
        "growth.epochs_per_iteration": 2, "growth.score_samples": 10000, "growth.connection_fraction": 0.1,
        "growth.feature_maps_per_step": 2, "growth.map_candidates": 8, "growth.adam_warm": "true",
        "pruning.scope": "global", "pruning.schedule_share": 0.7, "pruning.lr_schedule": '"phase"',
        "pruning.area_rate": 0.01, "pruning.max_iterations": 400}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--sizes", default="4000,8000")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="digits, sizes 1500,3000, 4 epochs, one seed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    dataset, name = ("digits", "resnet_digits_smoke") if args.smoke else ("mnist", "resnet_mnist")
    sizes, epochs, seeds = ("1500,3000", 4, 1) if args.smoke else (args.sizes, args.epochs, args.seeds)
    out = Path(args.out or ROOT / "bench" / "runs" / name)
    results = Path(args.results or ROOT / "bench" / "results" / name)
    sets = [a for key, value in NEST.items() for a in ("--set", f"{key}={value}")]
    if args.smoke:
        sets += ["--set", "growth.score_samples=512", "--set", "growth.max_epochs=2",
                 "--set", "growth.map_candidates=2"]
    cmd = [sys.executable, "-m", "nestsynth.cli", "compare", "--model", "resnet-mnist", "--dataset", dataset,
           "--methods", "nest,gradual", "--sizes", sizes, "--epochs", str(epochs), "--seeds", str(seeds),
           "--jobs", str(args.jobs), "--threads", "1", "--device", "cpu", "--out", str(out), *sets,
           "--title", f"ResNet-8 on {dataset}: NeST vs gradual, {epochs} epochs per run, {seeds} seed(s)"]
    if not args.smoke:
        cmd[cmd.index("--dataset") + 2:cmd.index("--dataset") + 2] = ["--data-dir", args.data_dir]
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if not (out / "curves.md").is_file():
        return rc or 1
    _publish(out, results, time.monotonic() - t0)
    return rc


def _publish(out: Path, results: Path, wall: float) -> None:
    """curves.md (with the command and the machine on top), curves.csv and curves.png into ``results``."""
    from compare_lenet300 import _torch  # bench/ is on sys.path when this script runs

    results.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {_torch()}"
    command = " ".join(["python bench/resnet_mnist.py", *sys.argv[1:]])
    (results / "curves.md").write_text(f"<!-- command: {command}; machine: {machine}; wall of this invocation "
                                       f"{wall:.0f} s (finished runs are reused) -->\n\n" + (out / "curves.md").read_text())
    for file in [f for f in ("curves.csv", "curves.png") if (out / f).is_file()]:
        shutil.copyfile(out / file, results / file)
    print(f"results in {results}")


if __name__ == "__main__":
    sys.exit(main())
