"""Error-size curves (``compare --sizes``) and sweeps (``sweep``): CSV, Markdown and plots.

Everything here reads report.json contents only (passed in as dicts), so the outputs can
be redrawn from the run directories at any time.
"""

from __future__ import annotations

from pathlib import Path

from .comparison import _fmt, _mean_std, format_csv

CURVE_FIELDS = ["method", "size", "seed", "weights", "flops", "flops_act", "test_error", "val_error", "epochs",
                "seconds", "run_dir"]
SWEEP_FIELDS = ["key", "value", "seed", "seed_weights", "post_growth_weights", "weights", "flops_act",
                "test_error", "val_error", "growth_iterations", "growth_epochs", "growth_seconds", "epochs",
                "seconds", "compression_weights", "compression_flops", "run_dir"]


def curve_row(report: dict, size: int | None, run_dir: str = "") -> dict:
    """One curves.csv row from a report.json; ``size`` is the target (None for dense)."""
    return {"method": report.get("method", "nest"), "size": size, "seed": report.get("seed"),
            "weights": report["weights"]["final"], "flops": report["flops"]["final"],
            "flops_act": report["flops"]["final_act"], "test_error": report.get("test_error"),
            "val_error": report.get("val_error"), "epochs": (report.get("budget") or {}).get("epochs"),
            "seconds": report.get("wall_seconds"), "run_dir": run_dir}


def format_curves_csv(rows: list[dict]) -> str:
    return format_csv(rows, CURVE_FIELDS)


_CURVE_INTS = ("size", "seed", "weights", "flops", "flops_act", "epochs")
_CURVE_TEXT = ("method", "run_dir")


def read_curves_csv(text: str) -> list[dict]:
    """The rows of a curves.csv written by :func:`format_curves_csv`, typed as written:
    ints for sizes, seeds, weights, FLOPs and epochs, floats for errors and seconds, None
    for an empty cell (the dense run has no size). A missing column or a cell that is not
    a number raises ValueError naming the line."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    missing = [f for f in CURVE_FIELDS if f not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"curves.csv lacks the column(s) {', '.join(missing)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {}
        for key in CURVE_FIELDS:
            value = (raw.get(key) or "").strip()
            if key in _CURVE_TEXT:
                row[key] = value
            elif not value:
                row[key] = None
            else:
                try:
                    row[key] = int(value) if key in _CURVE_INTS else float(value)
                except ValueError:
                    kind = "an integer" if key in _CURVE_INTS else "a number"
                    raise ValueError(f"curves.csv line {line}: {key} is {value!r}, not {kind}") from None
        rows.append(row)
    return rows


def join_curve_rows(sources: list[list[dict]]) -> tuple[list[dict], list[int]]:
    """The rows of several curves, one per (method, size, seed), a later source's row
    replacing an earlier one's; methods in first-seen order, then size (dense first) and
    seed. Also how many rows of each source survived."""
    rows: dict[tuple, tuple[int, dict]] = {}
    for i, source in enumerate(sources):
        for r in source:
            rows[(r["method"], r["size"], r["seed"])] = (i, r)
    order = list(dict.fromkeys(r["method"] for source in sources for r in source))
    kept = [0] * len(sources)
    for i, _ in rows.values():
        kept[i] += 1
    joined = sorted((r for _, r in rows.values()),
                    key=lambda r: (order.index(r["method"]), r["size"] is not None, r["size"] or 0,
                                   r["seed"] if r["seed"] is not None else -1))
    return joined, kept


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (method, size), methods in first-seen order, sizes ascending."""
    groups: dict[tuple, list[dict]] = {}
    order = list(dict.fromkeys(r["method"] for r in rows))
    for r in sorted(rows, key=lambda r: (order.index(r["method"]), r["size"] is not None, r["size"] or 0)):
        groups.setdefault((r["method"], r["size"]), []).append(r)
    return groups


def format_curves_markdown(rows: list[dict], title: str, notes: list[str] = ()) -> str:
    """Mean ± std per (method, size): test error, active weights, FLOPs, epochs, seconds,
    then test error with methods as columns (the curve as a table)."""
    lines = [f"# {title}", "", "| Method | Target size | Seeds | Test error (%) | Val error (%) | Active weights "
             "| FLOPs (act) | Epochs | Wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, size), rs in _groups(rows).items():
        lines.append(f"| {m} | {'dense' if size is None else f'{size:,}'} | {len(rs)} "
                     f"| {_fmt([r['test_error'] for r in rs], 100, 2)} | {_fmt([r['val_error'] for r in rs], 100, 2)} "
                     f"| {_fmt([r['weights'] for r in rs])} | {_fmt([r['flops_act'] for r in rs])} "
                     f"| {_fmt([r['epochs'] for r in rs])} | {_fmt([r['seconds'] for r in rs])} |")
    sizes = sorted({r["size"] for r in rows if r["size"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["size"] is not None))
    if sizes and methods:
        lines += ["", "Test error (%) by target size, mean ± std over seeds:", "",
                  "| Size | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
        for size in sizes:
            cells = [_fmt([r["test_error"] for r in rows if r["method"] == m and r["size"] == size], 100, 2)
                     for m in methods]
            lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + list(notes)) + "\n"


def _series(rows: list[dict], method: str, x: str) -> list[tuple[float, float, float]]:
    """(mean x, mean test error %, std) per target size of one method, ascending."""
    out = []
    for (m, size), rs in _groups(rows).items():
        errs = [100 * r["test_error"] for r in rs if r["test_error"] is not None]
        if m == method and size is not None and errs:
            out.append((_mean_std([r[x] for r in rs])[0], *_mean_std(errs)))
    return sorted(out)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, title: str) -> None:
    """Title, lay out, write ``path`` (folders made) and close the figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Test error vs active weights (left) and vs activation-aware FLOPs (right): one line
    per method with a ±std band; a dense run is a dashed horizontal line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    cmap = plt.get_cmap("tab10")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, x, label in zip(axes, ("weights", "flops_act"), ("active weights", "FLOPs (activation-aware)")):
        for k, m in enumerate(methods):
            dense = [100 * r["test_error"] for r in rows if r["method"] == m and r["size"] is None
                     and r["test_error"] is not None]
            if dense:
                ax.axhline(_mean_std(dense)[0], color=cmap(k % 10), ls="--", lw=1, label=f"{m} (dense)")
            pts = _series(rows, m, x)
            if pts:
                xs, ms, ss = zip(*pts)
                ax.plot(xs, ms, marker="o", color=cmap(k % 10), label=m)
                ax.fill_between(xs, [a - b for a, b in zip(ms, ss)], [a + b for a, b in zip(ms, ss)],
                                color=cmap(k % 10), alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(frameon=False, fontsize=8)
    _save(fig, path, title)


def sweep_row(report: dict, key: str, value: str, run_dir: str = "") -> dict:
    """One sweep.csv row: the swept value and the figures of the paper's Figs. 6-7."""
    growth = report.get("growth") or {}
    return {"key": key, "value": value, "seed": report.get("seed"),
            "seed_weights": report["weights"].get("seed"), "post_growth_weights": report["weights"].get("post_growth"),
            "weights": report["weights"]["final"], "flops_act": report["flops"]["final_act"],
            "test_error": report.get("test_error"), "val_error": report.get("val_error"),
            "growth_iterations": growth.get("iterations"), "growth_epochs": growth.get("epochs"),
            "growth_seconds": growth.get("seconds"), "epochs": (report.get("budget") or {}).get("epochs"),
            "seconds": report.get("wall_seconds"), "compression_weights": report["compression"]["weights"],
            "compression_flops": report["compression"]["flops"], "run_dir": run_dir}


def format_sweep_csv(rows: list[dict]) -> str:
    return format_csv(rows, SWEEP_FIELDS)


def _numeric(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_sweep(rows: list[dict], key: str, path: Path, title: str = "") -> None:
    """Three panels against the swept value (categorical when not numeric), mean ± std:
    growth time vs post-growth size (paper Fig. 6), final size (Fig. 7) and compression."""
    plt = _pyplot()
    values = list(dict.fromkeys(r["value"] for r in rows))
    nums = [_numeric(v) for v in values]
    xs = nums if all(n is not None for n in nums) else list(range(len(values)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("post_growth_weights", "growth_seconds", "post-growth weights", "growth time (s)"),
              (None, "weights", key, "final active weights"),
              (None, "compression_weights", key, "compression (dense / final weights)"))
    for ax, (xfield, yfield, xlabel, ylabel) in zip(axes, panels):
        for x, v in zip(xs, values):
            rs = [r for r in rows if r["value"] == v and r.get(yfield) is not None]
            if not rs:
                continue
            ym, ys = _mean_std([r[yfield] for r in rs])
            xm = _mean_std([r[xfield] for r in rs])[0] if xfield else x
            ax.errorbar([xm], [ym], yerr=[ys], fmt="o", capsize=3)
            ax.annotate(f"{key}={v}", (xm, ym), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if xfield is None and xs is not nums:
            ax.set_xticks(xs, values)
    _save(fig, path, title)
