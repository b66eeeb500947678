"""Benchmark: error-size curves of several methods at one epoch budget (nestsynth compare --sizes).

    python bench/curves.py --data-dir ../shared/data/mnist --jobs 2                      # LeNet-300-100
    python bench/curves.py --data-dir ../shared/data/mnist --jobs 2 --name curves_lenet5 \\
        --config configs/lenet-5-mnist-sized.toml --sizes 2000,4000,6000,8000           # LeNet-5

Runs ``nestsynth compare --sizes`` (finished runs are reused, so an interrupted benchmark
continues), then copies curves.csv, curves.md and curves.png, and every run's report.json
and metrics.jsonl, to bench/results/NAME/, with the machine and command line prepended to
curves.md.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--methods", default="nest,gradual,l0,dense")
    ap.add_argument("--sizes", default="3000,5000,8000,12000")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--name", default="curves_lenet300")
    ap.add_argument("--config", default=str(ROOT / "configs" / "lenet-300-100-mnist-sized.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST..FIRST+SEEDS-1")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of bench/results/NAME/curves.csv that this invocation did not run "
                         "(add a seed, or rerun one method) and redraw the tables and plot from all of them")
    args = ap.parse_args()
    out, results = ROOT / "bench" / "runs" / args.name, ROOT / "bench" / "results" / args.name
    cmd = [sys.executable, "-m", "nestsynth.cli", "compare", "--config", args.config, "--data-dir", args.data_dir,
           "--methods", args.methods, "--sizes", args.sizes, "--epochs", str(args.epochs), "--seeds", str(args.seeds),
           "--first-seed", str(args.first_seed), "--jobs", str(args.jobs), "--threads", "1", "--out", str(out),
           "--title", f"{Path(args.config).stem}: {'' if args.merge else f'{args.seeds} seeds, '}"
                      f"{args.epochs} epochs per run"]
    for s in args.set:
        cmd += ["--set", s]
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if not (out / "curves.md").is_file():
        return rc or 1
    previous = results / "curves.csv"
    kept = previous.read_text() if args.merge and previous.is_file() else None
    kept_md = (results / "curves.md").read_text() if kept is not None else ""
    copy_results(out, results, " ".join(sys.argv[1:]), time.monotonic() - t0, "curves")
    if kept is not None:
        merge_curves(kept, out, results, " ".join(sys.argv[1:]), kept_md)
    return rc


def merge_curves(kept_csv: str, out: Path, results: Path, argv: str, kept_md: str = "") -> None:
    """Rows of an earlier curves.csv that this run did not produce, joined to this run's
    rows; curves.csv/md/png of ``results`` redrawn from all of them (with the settings
    notes of both runs' curves.md)."""
    from nestsynth.report.curves import (format_curves_csv, format_curves_markdown, join_curve_rows, plot_curves,
                                         read_curves_csv)

    rows, (n_old, _) = join_curve_rows([read_curves_csv(kept_csv), read_curves_csv((out / "curves.csv").read_text())])
    md = (out / "curves.md").read_text()
    notes = [line for line in md.splitlines() if line.startswith("- ")]
    notes += [line for line in kept_md.splitlines() if line.startswith("- **")
              and not any(n.split(":")[0] == line.split(":")[0] for n in notes)]
    notes.append(f"- {n_old} rows kept from the earlier curves.csv (runs not repeated by this invocation)")
    title = next((line[2:] for line in md.splitlines() if line.startswith("# ")), "curves")
    header = f"<!-- merged: python bench/curves.py {argv} joined to the earlier rows -->\n\n"
    (results / "curves.csv").write_text(format_curves_csv(rows))
    (results / "curves.md").write_text(header + format_curves_markdown(rows, title, notes))
    plot_curves(rows, results / "curves.png", title)


def copy_results(out: Path, results: Path, argv: str, wall: float, stem: str, script: str = "curves.py") -> None:
    """STEM.csv/.md/.png and every run's report.json and metrics.jsonl into ``results``."""
    import torch

    results.mkdir(parents=True, exist_ok=True)
    header = (f"<!-- command: python bench/{script} {argv}; machine: {platform.machine()} "
              f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; wall of this "
              f"invocation {wall:.0f} s (finished runs are reused) -->\n\n")
    (results / f"{stem}.md").write_text(header + (out / f"{stem}.md").read_text())
    for ext in ("csv", "png"):
        shutil.copyfile(out / f"{stem}.{ext}", results / f"{stem}.{ext}")
    for report in out.rglob("report.json"):
        dest = results / "runs" / report.parent.relative_to(out)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "metrics.jsonl", "config.toml"):
            if (report.parent / name).is_file():
                shutil.copyfile(report.parent / name, dest / name)
    print(f"results in {results}")


if __name__ == "__main__":
    sys.exit(main())
