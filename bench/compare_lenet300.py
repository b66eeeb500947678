"""Benchmark: every method on LeNet-300-100 / MNIST, 3 seeds, one harness (nestsynth compare).

    python bench/compare_lenet300.py --data-dir ../shared/data/mnist [--jobs 2] [--seeds 3]

Runs ``nestsynth compare`` with configs/compare-lenet300-mnist.toml (finished runs are
reused, so an interrupted benchmark continues), then copies comparison.md,
comparison.csv and pareto.png to bench/results/compare_lenet300/ with the machine and
the command line prepended to the table.
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
METHODS = "nest,dense,random,han,oneshot,gradual,lottery,snip,grasp,l0,sensitivity,lobs,n2ps,radix"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--config", default=str(ROOT / "configs" / "compare-lenet300-mnist.toml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "runs" / "compare_lenet300"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "compare_lenet300"))
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "nestsynth.cli", "compare", "--config", args.config, "--data-dir", args.data_dir,
           "--methods", args.methods, "--seeds", str(args.seeds), "--jobs", str(args.jobs), "--threads", "1",
           "--out", args.out, "--title", f"LeNet-300-100 on MNIST, {args.seeds} seeds per method"]
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    wall = time.monotonic() - t0
    out, results = Path(args.out), Path(args.results)
    if not (out / "comparison.md").is_file():
        return rc or 1
    results.mkdir(parents=True, exist_ok=True)
    header = (f"<!-- command: python bench/compare_lenet300.py --jobs {args.jobs} --seeds {args.seeds}; "
              f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, "
              f"torch {_torch()}; wall of this invocation {wall:.0f} s (finished runs are reused) -->\n\n")
    (results / "comparison.md").write_text(header + (out / "comparison.md").read_text())
    for name in ("comparison.csv", "pareto.png"):
        shutil.copyfile(out / name, results / name)
    print(f"results in {results}")
    return rc


def _torch() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
