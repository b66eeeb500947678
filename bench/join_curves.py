"""Join the curves.csv of several committed results into one curve (csv, md, png).

    python bench/join_curves.py --name curves_lenet300_shipped \
        curves_lenet300_l0 curves_lenet300_release curves_lenet300_release12k curves_lenet300_release12k_l0

Each source is a folder under bench/results holding a curves.csv written by bench/curves.py,
or the output folder of a ``compare --sizes`` that was cut off before it wrote its curves.csv
(``METHOD/sizeN/seedK/report.json`` of the runs that finished; a path that is not under
bench/results): its runs' report.json, metrics.jsonl and config.toml are copied to
bench/results/NAME/runs/FOLDER/, as bench/curves.py keeps those of its runs.
A row of a later source replaces the row of an earlier one with the same method, size and
seed (so a rerun of some sizes with a changed default replaces the old runs and keeps the
rest); the joined rows are written to bench/results/NAME/curves.csv, .md and .png. Nothing is
trained: this redraws runs that are already recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _run_reports(folder: Path) -> list[tuple[Path, int | None]]:
    """(report.json, target size) of every finished run of a compare output folder:
    ``METHOD/sizeN/seedK``, and ``dense/seedK`` (no size), in path order."""
    reports = [(r, None) for r in sorted(folder.glob("dense/*/report.json"))]
    return reports + [(r, int(r.parent.parent.name[4:])) for r in sorted(folder.glob("*/size*/*/report.json"))]


def rows_of_runs(folder: Path) -> list[dict]:
    """curves.csv rows of the finished runs in a compare output folder (``METHOD/sizeN/seedK``
    with a report.json; the dense run is ``dense/seedK``), in path order."""
    import json

    from nestsynth.report.curves import curve_row

    return [curve_row(json.loads(report.read_text()), size, str(report.parent.relative_to(folder)))
            for report, size in _run_reports(folder)]


def _runs_folder(results: Path, name: str) -> Path | None:
    """The folder of runs a source names, or None for a results folder with a curves.csv."""
    return Path(name) if not (results / name / "curves.csv").is_file() and Path(name).is_dir() else None


def _read_source(results: Path, name: str) -> tuple[list[dict], str]:
    """Rows and title of a source (a results folder's curves.csv, or a folder of runs)."""
    from nestsynth.report.curves import read_curves_csv

    folder = results / name
    if _runs_folder(results, name) is not None:
        rows = rows_of_runs(Path(name))
        if not rows:
            raise ValueError("no finished run (METHOD/sizeN/seedK/report.json) in it")
        return rows, ""
    rows = read_curves_csv((folder / "curves.csv").read_text())
    md = folder / "curves.md"
    title = next((line[2:] for line in md.read_text().splitlines() if line.startswith("# ")), "") \
        if md.exists() else ""
    return rows, title


def main(argv: list[str] | None = None) -> int:
    from nestsynth.report.curves import format_curves_csv, format_curves_markdown, join_curve_rows, plot_curves

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="output folder under bench/results")
    parser.add_argument("--title", default="", help="title of the table and plot (default: the first source's)")
    parser.add_argument("sources", nargs="+", help="folders under bench/results (or folders of runs), earliest first")
    args = parser.parse_args(argv)
    results = ROOT / "bench" / "results"
    tables, titles = [], []
    for name in args.sources:
        try:
            rows, title = _read_source(results, name)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: cannot read the curve of {name}: {err}", file=sys.stderr)
            return 2
        tables.append(rows)
        titles.append(title)
    rows, kept = join_curve_rows(tables)
    out = results / args.name
    for name in args.sources:  # a folder of runs: keep its reports beside the joined curve
        folder = _runs_folder(results, name)
        for report, _ in _run_reports(folder) if folder is not None else []:
            for src in (report, report.parent / "metrics.jsonl", report.parent / "config.toml"):
                if src.is_file():
                    dest = out / "runs" / folder.name / src.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(src.read_bytes())
    title = args.title or titles[0] or "curves"
    notes = [f"- {n} of the {len(t)} rows of `{s}`" for s, t, n in zip(args.sources, tables, kept)]
    out.mkdir(parents=True, exist_ok=True)
    header = f"<!-- joined: python bench/join_curves.py {' '.join(sys.argv[1:] if argv is None else argv)} -->\n\n"
    (out / "curves.csv").write_text(format_curves_csv(rows))
    (out / "curves.md").write_text(header + format_curves_markdown(rows, title, notes))
    plot_curves(rows, out / "curves.png", title)
    print(f"{len(rows)} rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
