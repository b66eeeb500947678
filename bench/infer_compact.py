"""Benchmark: a synthesized model as a compact inference artifact (export, sizes, latency).

    python bench/infer_compact.py --data-dir ../shared/data/mnist                  # LeNet-300-100
    python bench/infer_compact.py --data-dir ../shared/data/mnist \
        --run bench/runs/lenet5_mnist/seed0                                        # LeNet-5

On a finished run (default bench/runs/lenet300_mnist/seed0, see bench/lenet300_mnist.py
and bench/lenet5_mnist.py) it runs
``nestsynth export`` (pytorch with ``--sparse auto`` timed at batch 1 and at batch 256,
safetensors, onnx, c), ``nestsynth evaluate`` on every loadable artifact and ``nestsynth
bench-infer`` on both PyTorch artifacts (latency at batch 1, 64, 256 of the dense
reference, the masked model, the compact model, every layer in the generated C kernel
and the ONNX model in onnxruntime), then writes
bench/results/infer_NAME.json and .md (NAME: the run's directory, e.g. lenet300_mnist).
Runs in about a minute (LeNet-300-100) or a few minutes (LeNet-5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "nestsynth.cli"] + [str(a) for a in args] + ["--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def kernel_text(spec: dict) -> str:
    return f"×{spec['kernel']}×{spec['kernel']}" if "kernel" in spec else ""


def layer_names(specs: list[dict]) -> list[str]:
    convs = sum(1 for s in specs if s.get("type") == "conv2d")
    return [f"conv{i + 1}" if s.get("type") == "conv2d" else f"fc{i - convs + 1}" for i, s in enumerate(specs)]


def latency_table(bench: dict, title: str) -> list[str]:
    bs = bench["batch_sizes"]
    lines = [f"#### {title}", "",
             "| model | executed FLOPs | FLOP ratio | " + " | ".join(
                 f"batch {b}: median ms [IQR] | speedup" for b in bs) + f" | GFLOP/s at {bs[-1]} |",
             "|---|---:|---:|" + "---:|---:|" * len(bs) + "---:|"]
    for v in bench["variants"]:
        cells = " | ".join(f"{v['latency'][str(b)]['median_ms']:.4f} [{v['latency'][str(b)]['iqr_ms']:.4f}] | "
                           f"{v['latency'][str(b)]['speedup']:.2f}×" for b in bs)
        lines.append(f"| {v['name']} | {v['executed_flops']:,} | {v['flop_ratio']:.1f}× | {cells} | "
                     f"{v['latency'][str(bs[-1])]['gflops']:.1f} |")
    fl = bench["flops"]
    names = layer_names(bench["storage"])
    lines += ["", f"Per-layer storage: " + ", ".join(
        f"{n} {s['in']}×{s['out']}{kernel_text(s)} {s['storage']}"
        + (f" (density {s['choice']['density']:.3f})" if 'density' in s.get('choice', {}) else "")
        + (" [CSR failed the 1e-5 check: dense]" if s.get('choice', {}).get('csr_fallback') else "")
        for n, s in zip(names, bench["storage"])) + f". Non-zero-weight FLOPs {fl['nonzero']:,} "
        f"({fl['nonzero_ratio']:.1f}× below the dense {fl['dense_reference']:,}).", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "bench" / "runs" / "lenet300_mnist" / "seed0"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every timing (default 1)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="the export check's bound on |compact - masked| (nestsynth export --tolerance)")
    ap.add_argument("--name", default=None, help="results name (default: infer_ + the run's directory)")
    args = ap.parse_args()
    run = Path(args.run)
    args.name = args.name or f"infer_{run.resolve().parent.name}"
    model_name = json.loads((run / "report.json").read_text())["model"]
    out = run / "export"
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    t = ["--threads", str(args.threads)]
    tol = ["--tolerance", str(args.tolerance)]
    exports = {
        "pytorch_auto_b1": cli(["export", run, "--format", "pytorch", "--sparse", "auto", "--batch-size", "1",
                                "--out", out / "compact.pt"] + data + t + tol, args.threads),
        "pytorch_auto_b256": cli(["export", run, "--format", "pytorch", "--sparse", "auto", "--batch-size", "256",
                                  "--out", out / "compact_b256.pt"] + data + t + tol, args.threads),
        "safetensors": cli(["export", run, "--format", "safetensors", "--sparse", "dense",
                            "--out", out / "compact.safetensors"] + data + t + tol, args.threads),
        "onnx": cli(["export", run, "--format", "onnx", "--out", out / "compact.onnx"] + data + t + tol,
                    args.threads),
        "c": cli(["export", run, "--format", "c", "--compile-check", "require", "--out", out / "compact.c"]
                 + data + t + tol, args.threads),
    }
    evaluations = {k: cli(["evaluate", e["artifact"]] + data, args.threads) for k, e in exports.items() if k != "c"}
    evaluations["c"] = {"test_error": exports["c"]["test_error_compact"]}  # the C output matched within the bound
    benches = {}
    for key, name in (("auto_b1", "compact.pt"), ("auto_b256", "compact_b256.pt")):
        benches[key] = cli(["bench-infer", out / name, "--onnx", out / "compact.onnx", "--repeats", args.repeats,
                            "--out", out / f"inference_{key}.json"] + t, args.threads)
    summary = {
        "command": " ".join(["python", "bench/infer_compact.py"] + sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
                   f"python {platform.python_version()}",
        "run": str(run), "threads": args.threads,
        "exports": exports, "evaluate": evaluations, "bench_infer": benches,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")

    sizes = benches["auto_b1"]["file_bytes"]
    masked_kind = "SparseCNN" if exports["onnx"].get("area_masks") is not None else "SparseMLP"
    lines = [f"### Compact {model_name} inference — `{summary['command']}`", "",
             f"Run `{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}`; {summary['machine']}; "
             f"{args.threads} thread(s); median of {args.repeats} timed samples after warm-up, [IQR]; export check "
             f"bound {args.tolerance:g}.", "",
             "| artifact | test error % | max \\|out − masked\\| | bytes |", "|---|---:|---:|---:|"]
    lines.append(f"| masked model.pt ({masked_kind}) | {100 * exports['onnx']['test_error_masked']:.2f} | – | "
                 f"{exports['onnx']['source_model_bytes']:,} |")
    for key, e in exports.items():
        diff = e.get("max_abs_diff_onnx_vs_masked", e.get("max_abs_diff_c_vs_masked", e["max_abs_diff"]))
        size = sum(e["files"].values())
        lines.append(f"| {Path(e['artifact']).name} ({key}) | {100 * evaluations[key]['test_error']:.2f} | "
                     f"{diff:.2e} | {size:,} |")
    lines.append(f"| dense {model_name} fp32 (computed) | – | – | "
                 f"{sizes['dense reference (fp32 weights+biases, computed)']:,} |")
    deep = benches["auto_b1"].get("deep_compression")
    if deep:
        conv = f", conv {deep['conv_bits']} bits" if deep.get("conv_bits") not in (None, deep["bits"]) else ""
        lines.append(f"| Deep Compression, Huffman-coded ({deep['bits']} bits{conv}; `nestsynth compress`) | "
                     f"{100 * deep['test_error_after']:.2f} | – | {deep['bytes']['huffman']:,} |")
    lines.append("")
    lines += latency_table(benches["auto_b1"], "compact.pt: `--sparse auto` decided at batch 1")
    lines += latency_table(benches["auto_b256"], "compact_b256.pt: `--sparse auto` decided at batch 256")
    lines.append("FLOPs are the multiply-adds each variant actually executes (×2): the masked model multiplies "
                 "full matrices of its widths, CSR layers only their non-zeros, ONNX is always dense. "
                 "The dense reference has random weights (timing only).")
    md = "\n".join(lines) + "\n"
    (results / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
