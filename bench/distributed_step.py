"""Probe: where one training step's time goes with 1 or N processes (LeNet-300-100, MNIST).

    OMP_NUM_THREADS=1 taskset -c 1 python bench/distributed_step.py
    OMP_NUM_THREADS=1 taskset -c 1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        bench/distributed_step.py

Trains 200 steps of batch 128 (augmented) with ``nestsynth.training.train_epoch`` and prints,
per rank, the total time, the time inside the gradient all-reduce (waiting for the other ranks
included) and inside the Adam step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nestsynth import distributed
from nestsynth.data import load_dataset, random_affine
from nestsynth.sparse import SparseMLP
from nestsynth.training import train_epoch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = distributed.init_from_env("cpu")
    data = load_dataset("mnist", args.data_dir, val_fraction=0.0833333, split_seed=0)
    n = 128 * args.steps
    X, y = data.train.X[:n], data.train.y[:n]
    model = SparseMLP([784, 300, 100, 10], "relu", False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    spent = {"reduce": 0.0, "adam": 0.0}

    def timed(fn, key):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t
            return out
        return run

    distributed.Dist.reduce_gradients = timed(distributed.Dist.reduce_gradients, "reduce")
    opt.step = timed(opt.step, "adam")

    def augment(xb, **rows):
        return random_affine(xb, gen, **rows)

    augment.by_rows = True
    t0 = time.perf_counter()
    train_epoch(model, X, y, opt, 128, gen, augment)
    total = time.perf_counter() - t0
    ms = lambda s: f"{1000 * s / args.steps:.1f} ms"
    print(f"rank {d.rank} of {d.world_size}: {ms(total)} per step, all-reduce {ms(spent['reduce'])}, "
          f"Adam {ms(spent['adam'])}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
