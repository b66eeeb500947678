"""Plain-text tables in the layout of the paper's Table 4."""

from __future__ import annotations


def _k(x: float) -> str:
    return f"{x / 1000:.1f}K" if x >= 1000 else f"{x:.0f}"


def format_layer_table(report: dict) -> str:
    """Per-layer table: weights, (Conv%,) Act% and FLOPs (activation-aware), then a summary.

    CNN reports get a Conv% column (area of interest kept by partial-area convolution),
    the layout of the paper's Table 4(b).
    """
    conv = any(r.get("conv_pct") is not None for r in report["layers"])
    stages = conv and all(r.get("weights_seed") is not None and r.get("weights_post_growth") is not None
                          for r in report["layers"])  # CNN runs: Seed and Post-Growth columns (Tables 5, 6)
    conv_head = f"{'Conv%':>7}" if conv else ""
    stage_head = f"{'Seed':>9}{'Growth':>9}" if stages else ""
    lines = [f"{'Layer':<8}{'In':>7}{'Out':>6}{stage_head}{'#Weights':>10}{conv_head}{'Act%':>7}{'FLOPs':>9}"
             f"{'FLOPs(act)':>12}"]
    for r in report["layers"]:
        act = "-" if r.get("act_pct") is None else f"{r['act_pct']:.0f}%"
        cp = ("N/A" if r.get("conv_pct") is None else f"{r['conv_pct']:.0f}%") if conv else ""
        st = f"{r['weights_seed']:>9}{r['weights_post_growth']:>9}" if stages else ""
        lines.append(f"{r['name']:<8}{r['in']:>7}{r['out']:>6}{st}{r['weights']:>10}{cp:>{7 if conv else 0}}{act:>7}"
                     f"{_k(r['flops']):>9}{_k(r['flops_act']):>12}")
    w, f = report["weights"], report["flops"]
    st = f"{w['seed']:>9}{w['post_growth']:>9}" if stages else ""
    lines.append(f"{'Total':<8}{'':>7}{'':>6}{st}{w['final']:>10}{'':>{7 if conv else 0}}{'':>7}{_k(f['final']):>9}"
                 f"{_k(f['final_act']):>12}")
    ref, comp = report["dense_reference"], report["compression"]
    err = report.get("test_error")
    lines += [
        "",
        f"{report.get('method', 'nest')}: model {report['model']} on {report['dataset']} (seed {report['seed']})",
        f"test error: {'-' if err is None else f'{100 * err:.2f}%'}   "
        f"val error: {100 * (report['val_error'] or 0):.2f}%",
        (f"weights: seed {w['seed']} -> post-growth {w['post_growth']} -> final {w['final']} "
         if w.get("seed") is not None else f"weights: final {w['final']} ")
        + f"(parameters incl. biases: {report['parameters_final']})",
        f"dense reference {'-'.join(map(str, ref['widths']))}: {ref['weights']} weights, {_k(ref['flops'])} FLOPs"
        + (f", test error {100 * ref['test_error']:.2f}%" if ref.get("test_error") is not None else ""),
        f"compression: {comp['weights']:.1f}x weights, {comp['flops']:.1f}x FLOPs; "
        f"wall time {report['wall_seconds']:.0f} s"
        + (f", {report['budget']['epochs']} training epochs" if (report.get("budget") or {}).get("epochs") else ""),
    ]
    return "\n".join(lines)
