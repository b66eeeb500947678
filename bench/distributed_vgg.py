"""Benchmark: scaling of a short NeST synthesis of the VGG-16 CIFAR seed with 1 and N processes.

    python bench/distributed_vgg.py --procs 1,2 --cpus 0,1 --train 640 --repeats 1

No CIFAR-10 copy is on this machine, so the data are random: ``--train`` (+ ``--test``) images
of 3x32x32 drawn from N(0, 1) with labels drawn uniformly from 10 classes, written to
``npz:bench/runs/distributed_vgg/random_cifar.npz`` (arrays X, y, X_test, y_test; seed 0).
The network cannot learn anything from them, so the errors mean nothing: the figures are
wall times only (a step of VGG-16 costs the same on random pixels as on CIFAR-10; the masks
the scans choose differ, so the later iterations' sizes are not those of a CIFAR-10 run).

The synthesis is ``--model vgg-16-cifar`` (r = 0.75 seed) with a small budget (``SHORT``: no
dense reference, 2 growth iterations of 1 epoch, 2 pruning iterations of 1 epoch, batch 64,
one feature map per conv layer per growth step from 2 candidates, 128 scan samples).  One
process runs as ``taskset -c CPU0 python -m nestsynth synthesize ...``; N processes as
``python -m torch.distributed.run --standalone --nproc_per_node=N --no-python bash -c ...``
where rank r execs ``taskset -c CPU_r python -m nestsynth synthesize ...``: every process has
one core of its own (``--cpus``, one per process) and one intra-op thread (OMP_NUM_THREADS=1).

Recorded per run: the whole command's wall time, the report's ``wall_seconds`` (the method
alone), the seconds of every logged row (each one training epoch plus its scans, growth or
pruning and validation), and from them seconds per epoch and optimizer steps per second.
Results: ``--out`` (results.json, results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
SHORT = ["data.val_fraction=0.1", "data.augment=false", "dense.train=false", f"train.batch_size={BATCH}",
         "train.min_steps_per_epoch=0", "growth.target=0.0", "growth.max_iterations=2",
         "growth.epochs_per_iteration=1", "growth.score_samples=128", "growth.map_candidates=2",
         "growth.feature_maps_per_step=1", "pruning.max_iterations=2", "pruning.retrain_epochs=1",
         "pruning.recover_epochs=0", "pruning.final_epochs=0", "pruning.tolerance=1.0"]
# the torchrun entry point: rank r takes the r-th CPU of $PIN and runs nestsynth there, one thread
PIN_RANK = 'cpu=$(echo "$PIN" | cut -d, -f$((LOCAL_RANK + 1))); exec taskset -c "$cpu" "$PY" -m nestsynth "$@"'


def write_data(path: Path, train: int, test: int) -> None:
    """Random 3x32x32 images (N(0, 1), float32) with uniform labels in 10 classes."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=rng.standard_normal((train, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 10, train),
             X_test=rng.standard_normal((test, 3, 32, 32), dtype=np.float32), y_test=rng.integers(0, 10, test))


def command(n: int, out: Path, data: Path, cpus: list[str]) -> list[str]:
    args = ["synthesize", "--quiet", "--device", "cpu", "--model", "vgg-16-cifar", "--dataset", f"npz:{data}",
            "--out", str(out)] + [f"--set={s}" for s in SHORT]
    if n == 1:
        return ["taskset", "-c", cpus[0], sys.executable, "-m", "nestsynth", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "--no-python",
            "bash", "-c", PIN_RANK, "bash", *args]


def run(n: int, out: Path, data: Path, cpus: list[str], train_images: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(n, out, data, cpus)
    env = dict(os.environ, OMP_NUM_THREADS="1", PIN=",".join(cpus[:n]), PY=sys.executable)
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        sys.exit(f"the {n}-process run failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    r = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in rows if x["phase"] in ("growth", "pruning")]
    per_epoch = statistics.median(x["seconds"] for x in epochs)
    steps = -(-(train_images - round(0.1 * train_images)) // BATCH)  # optimizer steps per epoch (val_fraction 0.1)
    return {"processes": n, "wall_s": round(wall, 1), "method_s": round(r["wall_seconds"], 1),
            "row_seconds": [(x["phase"], x["iteration"], round(x["seconds"], 1)) for x in epochs],
            "s_per_epoch": round(per_epoch, 1), "steps_per_s": round(steps / per_epoch, 3),
            "weights": r["weights"], "distributed": r.get("distributed"),
            "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--cpus", default="0,1", help="comma-separated CPUs, one per process (the most processes)")
    ap.add_argument("--train", type=int, default=640, help="random training images (10%% become validation)")
    ap.add_argument("--test", type=int, default=256, help="random test images")
    ap.add_argument("--repeats", type=int, default=1, help="runs per process count, interleaved (1, N, 1, N, ...)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed_vgg"))
    args = ap.parse_args()
    try:
        procs = [int(p) for p in args.procs.split(",")]
    except ValueError:
        sys.exit(f"--procs {args.procs!r} is not a comma-separated list of process counts, e.g. 1,2.")
    cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    if min(procs) < 1 or max(procs) > len(cpus) or not all(c.isdigit() for c in cpus):
        sys.exit(f"--cpus {args.cpus!r} must name one CPU number per process ({max(procs)} for --procs {args.procs}).")
    if args.train < 20 or args.test < 1 or args.repeats < 1:
        sys.exit("--train needs at least 20 images, --test and --repeats at least 1.")
    runs = ROOT / "bench" / "runs" / "distributed_vgg"
    data = runs / "random_cifar.npz"
    write_data(data, args.train, args.test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.repeats):
        for n in procs:
            rows.append(run(n, runs / f"run_{n}", data, cpus, args.train))
            print(json.dumps(rows[-1]), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
               "cpus_used": args.cpus, "threads_per_process": 1, "torch": torch.__version__,
               "python": platform.python_version()}
    (out / "results.json").write_text(json.dumps({"machine": machine, "data": {"train": args.train, "test": args.test,
                                                                                "random": True},
                                                  "budget": SHORT, "runs": rows}, indent=2))
    base = statistics.median(x["s_per_epoch"] for x in rows if x["processes"] == procs[0])
    lines = [f"VGG-16 CIFAR seed on random 3x32x32 data ({args.train} images, 10% validation), short budget "
             f"({', '.join(SHORT)}); one core and one thread per process (cpus {args.cpus}); "
             f"{args.repeats} interleaved run(s) per count (medians).",
             "", "| processes | wall (s) | method (s) | s per epoch (row) | steps/s | speed-up per epoch |",
             "|---|---|---|---|---|---|"]
    for n in procs:
        mine = [r for r in rows if r["processes"] == n]
        per = statistics.median(x["s_per_epoch"] for x in mine)
        lines.append(f"| {n} | {statistics.median(x['wall_s'] for x in mine):.1f} | "
                     f"{statistics.median(x['method_s'] for x in mine):.1f} | {per:.1f} | "
                     f"{statistics.median(x['steps_per_s'] for x in mine):.3f} | {base / per:.2f}x |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
