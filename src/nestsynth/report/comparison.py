"""Side-by-side comparison of finished runs: comparison.md, comparison.csv, pareto.png.

Everything here reads report.json files only, so the outputs can be redrawn from the
run directories at any time.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

CSV_FIELDS = ["method", "seed", "test_error", "val_error", "weights", "flops", "flops_act",
              "compression_weights", "compression_flops", "epochs", "wall_seconds", "dense_test_error", "run_dir"]


def run_row(report: dict, run_dir: str = "") -> dict:
    """One CSV row (plain numbers) from a report.json."""
    return {
        "method": report.get("method", "nest"),
        "seed": report.get("seed"),
        "test_error": report.get("test_error"),
        "val_error": report.get("val_error"),
        "weights": report["weights"]["final"],
        "flops": report["flops"]["final"],
        "flops_act": report["flops"]["final_act"],
        "compression_weights": report["compression"]["weights"],
        "compression_flops": report["compression"]["flops"],
        "epochs": (report.get("budget") or {}).get("epochs"),
        "wall_seconds": report.get("wall_seconds"),
        "dense_test_error": report.get("dense_reference", {}).get("test_error"),
        "run_dir": run_dir,
    }


def format_csv(rows: list[dict], fields: list[str] = CSV_FIELDS) -> str:
    """CSV text with a header of ``fields`` (missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    return buf.getvalue()


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, scale: float = 1.0, digits: int = 0, suffix: str = "") -> str:
    m, s = _mean_std([None if v is None else v * scale for v in values])
    if m != m:  # nan
        return "-"
    return f"{m:,.{digits}f} ± {s:,.{digits}f}{suffix}"


def format_markdown(rows: list[dict], reference: dict | None, title: str, notes: list[str] = ()) -> str:
    """The comparison table (one row per method, mean ± std over seeds), Table 2's layout."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"# {title}", ""]
    if reference:
        lines.append(f"Dense reference architecture {'-'.join(map(str, reference['widths']))}: "
                     f"{reference['weights']:,} weights, {reference['flops']:,} FLOPs. "
                     "Compression ratios are against it; FLOPs are activation-aware (zero inputs skipped, "
                     "network input dense), the convention of the paper's Table 4.")
        lines.append("")
    lines += ["| Method | Seeds | Test error (%) | Active weights | FLOPs (act) | Weights × | FLOPs × "
              "| Epochs | Wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        lines.append(
            f"| {m} | {len(rs)} | {_fmt([r['test_error'] for r in rs], 100, 2)} "
            f"| {_fmt([r['weights'] for r in rs])} | {_fmt([r['flops_act'] for r in rs])} "
            f"| {_fmt([r['compression_weights'] for r in rs], digits=1)} "
            f"| {_fmt([r['compression_flops'] for r in rs], digits=1)} "
            f"| {_fmt([r['epochs'] for r in rs])} | {_fmt([r['wall_seconds'] for r in rs])} |")
    lines.append("")
    lines += list(notes)
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path: Path, title: str = "") -> None:
    """Test error vs active weights, one marker per run, one colour per method (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>phX*"
    for k, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [(r["weights"], 100 * r["test_error"]) for r in rows
               if r["method"] == m and r["test_error"] is not None]
        if pts:
            ax.scatter(*zip(*pts), color=cmap(k % 20), marker=markers[k % len(markers)], s=36, label=m,
                       edgecolors="black", linewidths=0.4, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("active weights")
    ax.set_ylabel("test error (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
