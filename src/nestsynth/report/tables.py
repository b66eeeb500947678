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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_outcome(report: dict, history: list[dict], max_iterations: int | None = None) -> str:
    """What happened, in words: did growth reach its target, why did pruning stop, and which
    iteration the kept model comes from (the last printed iteration may be a rejected one).

    Reads ``report["pruning"]["stop_reason"]`` / ``["kept_iteration"]`` when the run recorded
    them, else infers them from ``history`` (the rows of metrics.jsonl); ``max_iterations``
    (``pruning.max_iterations``) names the iteration limit.  Baseline runs (no growth or
    pruning section) get "".
    """
    growth, pruning = report.get("growth"), report.get("pruning")
    if not isinstance(growth, dict) or not isinstance(pruning, dict):
        return ""
    lines = []
    rows = [r for r in history if r.get("phase") == "growth"]
    target = growth.get("target_val_error")
    if rows:
        how = (f"reached the target validation error {_pct(target)}" if growth.get("reached") else
               f"stopped without reaching the target validation error {_pct(target)}")
        lines.append(f"growth: {how} after {len(rows)} iteration{'s' * (len(rows) != 1)} "
                     f"(validation error {_pct(rows[-1].get('val_error'))})")
    prune = [r for r in history if r.get("phase") == "pruning"]
    reason = pruning.get("stop_reason")
    if reason is None and prune:  # runs written before the loop recorded its reason
        reason = ("bound" if prune[-1].get("accepted") is False else
                  "iterations" if max_iterations is not None and len(prune) >= max_iterations else None)
    bound = pruning.get("bound_val_error")
    why = {"bound": f"the validation error rose above the bound {_pct(bound)}",
           "target": f"the size target ({pruning.get('target_weights') or 0:,} connections) was reached",
           "schedule": "its size schedule ended",
           "floor": "nothing was left to remove (every layer at pruning.min_weights)",
           "iterations": "it reached the iteration limit"
                         + (f" (pruning.max_iterations = {max_iterations})" if max_iterations else "")}
    if prune:
        lines.append(f"pruning: {len(prune)} iteration{'s' * (len(prune) != 1)}, "
                     f"{sum(bool(r.get('accepted')) for r in prune)} kept; stopped because "
                     + why.get(reason, str(reason or "unknown (not recorded)")))
    kept = pruning.get("kept_iteration")
    accepted = [r for r in prune if r.get("accepted")]
    if "kept_iteration" not in pruning and accepted:  # runs written before the loop recorded it
        kept = accepted[-1].get("iteration")
    row = next((r for r in reversed(accepted) if r.get("iteration") == kept), None)
    source = (f"pruning iteration {kept}" if kept is not None else
              "the end of growth (no pruning iteration was kept)" if prune else "the end of growth")
    tuned = any(r.get("phase") == "finetune" and r.get("accepted") for r in history)
    detail = f" ({row['weights']} weights, validation error {_pct(row.get('val_error'))})" if row else ""
    lines.append(f"kept model: {source}{detail}" + (", then fine-tuned" if tuned else "")
                 + f"; final validation error {_pct(report.get('val_error'))}")
    return "\n".join(lines)
