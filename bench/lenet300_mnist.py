"""Benchmark: NeST on LeNet-300-100 / MNIST (paper Table 2), several seeds.

    python bench/lenet300_mnist.py --data-dir ../shared/data/mnist

Runs ``nestsynth synthesize`` from configs/lenet-300-100-mnist.toml once per seed
(finished runs are reused, interrupted ones resumed), then writes the mean +- std of
test error, final weights, FLOPs, post-growth size and wall time -- and of the dense
LeNet-300-100 trained in the same pipeline -- to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(config: Path, seed: int, out: Path, data_dir: str | None, sets: list[str], threads: int) -> dict:
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    cmd = [sys.executable, "-m", "nestsynth.cli", "synthesize", "--quiet", "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    else:
        cmd += ["--config", str(config), "--seed", str(seed)] + [f"--set={s}" for s in sets]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(out.parent / f"seed{seed}.log", "a") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((out / "report.json").read_text())


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(reports: list[dict]) -> dict:
    def col(f):
        return mean_std([float(f(r)) for r in reports])

    return {
        "runs": len(reports),
        "test_error_pct": col(lambda r: 100 * r["test_error"]),
        "val_error_pct": col(lambda r: 100 * r["val_error"]),
        "weights_final": col(lambda r: r["weights"]["final"]),
        "weights_post_growth": col(lambda r: r["weights"]["post_growth"]),
        "weights_seed": col(lambda r: r["weights"]["seed"]),
        "flops_final": col(lambda r: r["flops"]["final"]),
        "flops_final_act": col(lambda r: r["flops"]["final_act"]),
        "compression_weights": col(lambda r: r["compression"]["weights"]),
        "compression_flops": col(lambda r: r["compression"]["flops"]),
        "wall_seconds": col(lambda r: r["wall_seconds"]),
        "dense_test_error_pct": col(lambda r: 100 * r["dense_reference"]["test_error"]),
        "dense_val_error_pct": col(lambda r: 100 * r["dense_reference"]["val_error"]),
        "per_seed": [{"seed": r["seed"], "test_error_pct": 100 * r["test_error"], "weights": r["weights"],
                      "flops_act": r["flops"]["final_act"], "widths": r["widths"]["final"],
                      "layers": [(x["name"], x["weights"], round(x["act_pct"] or 0)) for x in r["layers"]],
                      "wall_seconds": r["wall_seconds"]} for r in reports],
    }


def markdown(s: dict, title: str) -> str:
    def f(key, digits=2, scale=1.0):
        m, sd = s[key]
        return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"

    lines = [f"### {title}", "",
             "| | test error % | active weights | FLOPs (act-aware) | post-growth weights | wall s |",
             "|---|---|---|---|---|---|",
             f"| NeST ({s['runs']} seeds) | {f('test_error_pct')} | {f('weights_final', 0)} | "
             f"{f('flops_final_act', 0)} | {f('weights_post_growth', 0)} | {f('wall_seconds', 0)} |",
             f"| dense LeNet-300-100, same pipeline | {f('dense_test_error_pct')} | 266200 | 532400 | – | – |",
             "", "| seed | test error % | weights | FLOPs (act) | final widths | per layer (weights, Act%) |",
             "|---|---|---|---|---|---|"]
    for r in s["per_seed"]:
        lines.append(f"| {r['seed']} | {r['test_error_pct']:.2f} | {r['weights']['final']} | {r['flops_act']} | "
                     f"{'-'.join(map(str, r['widths']))} | {r['layers']} |")
    return "\n".join(lines) + "\n"


def bench_main(script: str, default_config: str, name: str, title: str, summarize, markdown) -> None:
    """The command line every multi-seed synthesis benchmark shares: run the seeds
    (``--jobs`` at a time), ``summarize(reports, run_dirs)``, write
    bench/results/NAME.{json,md} with ``markdown(summary, title)`` and print it."""
    ap = argparse.ArgumentParser(description=f"Benchmark: {title}, several seeds.")
    ap.add_argument("--config", default=str(ROOT / "configs" / default_config))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "runs" / name))
    ap.add_argument("--name", default=name)
    ap.add_argument("--set", action="append", default=[], help="config override for new runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    args = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [Path(args.out) / f"seed{s}" for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(lambda sr: run_seed(Path(args.config), sr[0], sr[1], args.data_dir, args.set,
                                                    threads), zip(args.seeds, runs)))
    summary = summarize(reports, runs)
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    summary["command"] = " ".join(["python", script] + sys.argv[1:])
    summary["threads_per_run"] = threads
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary, f"{title} — `{summary['command']}`")
    (results / f"{args.name}.md").write_text(md)
    print(md)


def main() -> None:
    bench_main("bench/lenet300_mnist.py", "lenet-300-100-mnist.toml", "lenet300_mnist",
               "NeST LeNet-300-100 / MNIST", lambda reports, runs: summarize(reports), markdown)


if __name__ == "__main__":
    main()
