"""Benchmark: NeST on LeNet-5 / MNIST (paper Table 2 / Table 4(b)), several seeds.

    python bench/lenet5_mnist.py --data-dir ../shared/data/mnist [--seeds 0 1 2] [--jobs 2]

Runs ``nestsynth synthesize`` from configs/lenet-5-mnist.toml once per seed (finished
runs are reused, interrupted ones resumed), then writes test error, active weights,
FLOPs with and without partial-area convolution (plain and activation-aware), Conv% per
conv layer and wall time (mean +- std) to bench/results/lenet5_mnist.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from lenet300_mnist import bench_main, mean_std, summarize as mlp_summarize  # noqa: E402  (same runner: CLI subprocess per seed)


def flops_without_area(run: Path) -> int:
    """FLOPs (plain) of the final model with every partial-area mask switched back on."""
    import torch

    from nestsynth.metrics import layer_table, totals
    from nestsynth.report import load_model

    model = load_model(run / "model.pt")
    with torch.no_grad():
        for layer in model.layers[:model.n_conv]:
            layer.area.fill_(1.0)
    return round(totals(layer_table(model))["flops"])


def map_growth(runs: list[Path]) -> dict:
    """Policy 3 as measured: per growth step and conv layer, the loss reduction of the
    chosen maps (best of the candidates) and the mean reduction over all candidates (what
    one random set gives on average), from every run's metrics.jsonl."""
    best, rand = [], []
    for run in runs:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "map_best_reduction" in row:
                best += row["map_best_reduction"]
                rand += row["map_random_reduction"]
    if not best:
        return {}
    mb, mr = sum(best) / len(best), sum(rand) / len(rand)
    return {"layer_steps": len(best), "best_mean": mb, "random_mean": mr,
            "best_positive_share": sum(b > 0 for b in best) / len(best),
            "random_positive_share": sum(r > 0 for r in rand) / len(rand),
            "ratio_of_means": mb / mr if mr > 0 else None}


def summarize(reports: list[dict], runs: list[Path]) -> dict:
    """The LeNet-300-100 summary (errors, weights, FLOPs, wall time, dense reference)
    plus the CNN columns and a per-seed table with Conv%."""
    def col(f):
        return mean_std([float(f(r)) for r in reports])

    no_area = [flops_without_area(run) for run in runs]
    convs = [x["name"] for x in reports[0]["layers"] if x.get("conv_pct") is not None]
    return {
        **mlp_summarize(reports),
        "flops_without_area": mean_std([float(v) for v in no_area]),
        "conv_pct": {name: col(lambda r, name=name: next(x["conv_pct"] for x in r["layers"] if x["name"] == name))
                     for name in convs},
        "map_growth": map_growth(runs),
        "epochs": col(lambda r: (r.get("budget") or {}).get("epochs") or 0),
        "per_seed": [{"seed": r["seed"], "test_error_pct": 100 * r["test_error"], "weights": r["weights"],
                      "flops": r["flops"], "flops_without_area": na, "widths": r["widths"]["final"],
                      "layers": [(x["name"], x["weights"], None if x.get("conv_pct") is None else round(x["conv_pct"]),
                                  round(x["act_pct"] or 0)) for x in r["layers"]],
                      "wall_seconds": r["wall_seconds"]} for r, na in zip(reports, no_area)],
    }


def markdown(s: dict, title: str) -> str:
    def f(v, digits=0, scale=1.0):
        m, sd = v
        return f"{m * scale:,.{digits}f} ± {sd * scale:,.{digits}f}"

    conv = ", ".join(f"{k} {f(v)}%" for k, v in s["conv_pct"].items())
    lines = [f"### {title}", "",
             "| | test error % | active weights | FLOPs (plain) | FLOPs (act-aware) | FLOPs without partial area "
             "| Conv% | epochs | wall s |", "|---|---|---|---|---|---|---|---|---|",
             f"| NeST ({s['runs']} seeds) | {f(s['test_error_pct'], 2)} | {f(s['weights_final'])} | "
             f"{f(s['flops_final'])} | {f(s['flops_final_act'])} | {f(s['flops_without_area'])} | {conv} | "
             f"{f(s['epochs'])} | {f(s['wall_seconds'])} |",
             f"| dense LeNet-5, same pipeline | {f(s['dense_test_error_pct'], 2)} | 430,500 | 4,586,000 | – | – | – "
             "| – | – |",
             "", "| seed | test error % | weights | FLOPs plain / act / without area | final widths "
             "| per layer (weights, Conv%, Act%) |", "|---|---|---|---|---|---|"]
    mg = s.get("map_growth")
    if mg:
        ratio = (f"{mg['ratio_of_means']:.1f}×" if mg["ratio_of_means"] is not None
                 else "undefined (a random set raises the loss on average)")
        tail = [
            "", f"Feature-map growth (Policy 3), {mg['layer_steps']} layer-steps: loss reduction of the chosen "
            f"maps {mg['best_mean']:.2e} on average ({100 * mg['best_positive_share']:.0f}% positive), of one "
            f"random candidate set {mg['random_mean']:.2e} ({100 * mg['random_positive_share']:.0f}% positive); "
            f"ratio {ratio}."]
    else:
        tail = []
    for r in s["per_seed"]:
        lines.append(f"| {r['seed']} | {r['test_error_pct']:.2f} | {r['weights']['final']} | "
                     f"{r['flops']['final']} / {r['flops']['final_act']} / {r['flops_without_area']} | "
                     f"{'-'.join(map(str, r['widths']))} | {r['layers']} |")
    lines += tail
    return "\n".join(lines) + "\n"


def main() -> None:
    bench_main("bench/lenet5_mnist.py", "lenet-5-mnist.toml", "lenet5_mnist", "NeST LeNet-5 / MNIST", summarize,
               markdown)


if __name__ == "__main__":
    main()
