"""Benchmark: wall time of a short LeNet-300-100 / MNIST synthesis with 1 and N processes.

    python bench/distributed_lenet300.py --data-dir ../shared/data/mnist --procs 1,2 --cpus 1 --repeats 3

Runs configs/lenet-300-100-mnist.toml with a short budget (``SHORT``: 2 dense epochs, 2
growth iterations of 1 epoch, 2 pruning iterations of 1 epoch, no recovery or fine-tuning)
once per process count: one process as ``python -m nestsynth``, N as ``python -m
torch.distributed.run --standalone --nproc_per_node=N -m nestsynth`` (gloo), one intra-op
thread per process (OMP_NUM_THREADS=1), every process pinned by ``taskset -c CPUS``.  The
wall time is the whole command, start-up and data loading included; the report's own
wall time (the method alone) and test error, final weights and the distributed block are
recorded too.  Results: bench/results/distributed_lenet300/results.json and results.md.

With ``--cpus 1`` all processes share one core, so N processes cannot be faster than one:
the figure is then the cost of the distribution (the collectives, and the work every rank
repeats: augmentation of the global batch, the scans that are not sharded).  Give as many
free cores as processes (``--cpus 0,1``) to measure the speed-up.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["dense.epochs=2", "growth.max_iterations=2", "growth.epochs_per_iteration=1", "pruning.max_iterations=2",
         "pruning.retrain_epochs=1", "pruning.recover_epochs=0", "pruning.final_epochs=0"]


def command(n: int, out: Path, data_dir: str | None, cpus: str) -> list[str]:
    launch = ["-m", "nestsynth"] if n == 1 else \
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "nestsynth"]
    cmd = ["taskset", "-c", cpus, sys.executable, *launch, "synthesize", "--quiet", "--out", str(out),
           "--config", str(ROOT / "configs" / "lenet-300-100-mnist.toml")] + [f"--set={s}" for s in SHORT]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


def run(n: int, out: Path, data_dir: str | None, cpus: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(n, out, data_dir, cpus)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.monotonic() - t0
    r = json.loads((out / "report.json").read_text())
    return {"processes": n, "wall_s": round(wall, 1), "method_s": round(r["wall_seconds"], 1),
            "test_error_pct": round(100 * r["test_error"], 2), "weights_final": r["weights"]["final"],
            "distributed": r.get("distributed"), "command": " ".join(cmd[:3] + ["python"] + cmd[4:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--cpus", default="1", help="taskset CPU list for every process")
    ap.add_argument("--repeats", type=int, default=1, help="runs per process count, interleaved (1, N, 1, N, ...)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed_lenet300"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, procs = [], [int(p) for p in args.procs.split(",")]
    for _ in range(args.repeats):
        for n in procs:
            rows.append(run(n, ROOT / "bench" / "runs" / "distributed_lenet300" / f"run_{n}", args.data_dir, args.cpus))
            print(json.dumps(rows[-1]), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
               "cpus_used": args.cpus, "threads_per_process": 1, "torch": torch.__version__,
               "python": platform.python_version()}
    (out / "results.json").write_text(json.dumps({"machine": machine, "budget": SHORT, "runs": rows}, indent=2))
    lines = [f"LeNet-300-100 / MNIST, short budget ({', '.join(SHORT)}); cpus {args.cpus}, one thread per process; "
             f"{args.repeats} interleaved run(s) per count (median, then every run).",
             "", "| processes | wall (s) | method (s) | method, every run (s) | test error | final weights | mask checks |",
             "|---|---|---|---|---|---|---|"]
    for n in procs:
        mine = [r for r in rows if r["processes"] == n]
        r = mine[0]
        checks = r["distributed"]["mask_checks"] if r["distributed"] else "-"
        lines.append(f"| {n} | {statistics.median(x['wall_s'] for x in mine):.1f} | "
                     f"{statistics.median(x['method_s'] for x in mine):.1f} | "
                     f"{', '.join(str(x['method_s']) for x in mine)} | {r['test_error_pct']}% | "
                     f"{r['weights_final']:,} | {checks} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
