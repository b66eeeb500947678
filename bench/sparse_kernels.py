"""Benchmark: which CPU kernel runs a compact MLP fastest (what bounds the batch-256 speedup).

    python bench/sparse_kernels.py [--artifact bench/runs/lenet300_mnist/seed0/export/compact.pt]

Times the forward of the exported compact LeNet-300-100 (its layers, widths and
non-zeros) with every kernel family at hand, on one thread, at batch 1 and 256, against
the dense 784-300-100-10 in PyTorch:

* PyTorch dense ``addmm`` of the compact widths;
* PyTorch CSR, sparse @ dense with feature-major activations (what ``--sparse csr`` runs);
* PyTorch dense @ CSR(W^T) and COO ``sparse.addmm``;
* scipy CSR, feature-major;
* the generated C kernel (``--sparse ckernel``, :mod:`nestsynth.export.ckernel`): every
  layer in one call, tile 32, with ``-O3 -march=native`` (what ``auto`` builds), with the
  portable ``-O3`` only, with plain C99 loops (``-DNEST_PLAIN_C``, no GNU C vectors), and
  with tiles of 8 and 128 samples;
* onnxruntime, dense compact widths, and the dense reference in onnxruntime (when installed).

Writes bench/results/sparse_kernels.{json,md}.  Effective GFLOP/s = non-zero FLOPs of
the compact model (2 x nnz x batch) per second, for the sparse kernels; executed FLOPs
for the dense ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


def median_ms(fn, repeats: int, min_sample_s: float = 2e-3) -> float:
    for _ in range(10):
        fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_sample_s:
        fn()
        n += 1
    inner = max(1, n)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return 1e3 * statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=str(ROOT / "bench" / "runs" / "curves_lenet300" / "nest" / "size3000"
                                              / "seed0" / "export" / "compact.pt"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    args = ap.parse_args()
    torch.set_num_threads(1)
    import scipy.sparse as sp

    from nestsynth.export.ckernel import CKernel
    from nestsynth.export.formats import load_pytorch, onnx_bytes, OnnxModel

    model = load_pytorch(Path(args.artifact))
    Ws = [layer.dense_weight().contiguous() for layer in model.layers]
    bs = [layer.bias.contiguous() for layer in model.layers]
    idx = model.input_index
    nnz = sum(int((w != 0).sum()) for w in Ws)
    widths = [784, 300, 100, 10]
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(o, i, generator=g) * 0.05 for i, o in zip(widths[:-1], widths[1:])]
    ref_b = [torch.zeros(o) for o in widths[1:]]
    dense_flops = 2 * sum(w.numel() for w in ref)
    compact_flops = 2 * sum(w.numel() for w in Ws)
    csr = [w.to_sparse_csr() for w in Ws]
    csr_t = [w.t().contiguous().to_sparse_csr() for w in Ws]
    coo = [w.to_sparse_coo() for w in Ws]
    sci = [sp.csr_matrix(w.numpy()) for w in Ws]
    sci_b = [b.numpy()[:, None] for b in bs]
    relu = torch.relu
    last = len(Ws) - 1

    def gather(x):
        x = x.flatten(1)
        return x if idx is None else x.index_select(1, idx)

    def run_dense(ws, b_, read=lambda x: x.flatten(1)):
        def f(x):
            h = read(x)
            for i, (w, b) in enumerate(zip(ws, b_)):
                h = torch.addmm(b, h, w.t())
                h = relu(h) if i < last else h
            return h
        return f

    run_compact_dense = run_dense(Ws, bs, gather)

    def run_csr(x):
        h = gather(x).t()
        for i, (w, b) in enumerate(zip(csr, bs)):
            h = torch.addmm(b[:, None], w, h)
            h = relu(h) if i < last else h
        return h.t()

    def run_dense_csr(x):
        h = gather(x)
        for i, (w, b) in enumerate(zip(csr_t, bs)):
            h = torch.addmm(b, h, w)
            h = relu(h) if i < last else h
        return h

    def run_coo(x):
        h = gather(x).t()
        for i, (w, b) in enumerate(zip(coo, bs)):
            h = torch.sparse.addmm(b[:, None].expand(-1, h.shape[1]).contiguous(), w, h)
            h = relu(h) if i < last else h
        return h.t()

    def run_scipy(x):
        h = np.ascontiguousarray(gather(x).numpy().T)
        for i, (w, b) in enumerate(zip(sci, sci_b)):
            h = w @ h + b
            h = np.maximum(h, 0) if i < last else h
        return torch.from_numpy(np.ascontiguousarray(h.T))

    kernels = [("dense reference 784-300-100-10 (PyTorch addmm)", run_dense(ref, ref_b), dense_flops, "dense"),
               ("compact widths, dense (PyTorch addmm)", run_compact_dense, compact_flops, "dense"),
               ("compact, CSR @ dense, feature-major (PyTorch)", run_csr, 2 * nnz, "sparse"),
               ("compact, dense @ CSR(W^T) (PyTorch)", run_dense_csr, 2 * nnz, "sparse"),
               ("compact, COO sparse.addmm (PyTorch)", run_coo, 2 * nnz, "sparse"),
               ("compact, CSR feature-major (scipy)", run_scipy, 2 * nnz, "sparse")]
    c_variants = [("-O3 -march=native, tile 32 (auto's build)", 32, ("-O3", "-march=native")),
                  ("-O3 only (portable)", 32, ("-O3",)),
                  ("-O3 -march=native, plain C99 loops", 32, ("-O3", "-march=native", "-DNEST_PLAIN_C")),
                  ("-O3 -march=native, tile 8", 8, ("-O3", "-march=native")),
                  ("-O3 -march=native, tile 128", 128, ("-O3", "-march=native"))]
    for name, tile, flags in c_variants:
        kernel = CKernel(model.layers, model.raw_input_shape(), idx, tile=tile, flag_sets=(flags,))
        kernels.append((f"compact, generated C kernel, {name}", kernel, 2 * nnz, "sparse"))
    try:
        from nestsynth.export.pipeline import dense_reference_model

        def ort(m):
            r = OnnxModel(onnx_bytes(m), threads=1)
            return lambda x: r.run_numpy(x.reshape(x.shape[0], *(r.input_shape or [-1])).numpy())

        kernels.append(("compact widths, dense (onnxruntime)", ort(model.densified()), compact_flops, "dense"))
        reference = dense_reference_model(widths, ["relu", "relu"], [1, 28, 28])
        kernels.append(("dense reference 784-300-100-10 (onnxruntime)", ort(reference), dense_flops, "dense"))
    except Exception as exc:  # onnxruntime missing: the row is left out
        print(f"onnxruntime row skipped: {exc}", file=sys.stderr)
    x_check = torch.rand(8, 1, 28, 28, generator=g)
    with torch.inference_mode():
        want = model(x_check)
        rows = []
        for name, fn, flops, kind in kernels:
            if not name.startswith("dense reference"):  # the compact kernels compute the same function
                got = torch.as_tensor(np.asarray(fn(x_check)))
                assert float((got - want).abs().max()) < 1e-4, name
            row = {"kernel": name, "kind": kind, "flops_per_sample": flops, "ms": {}, "gflops": {}}
            for b in args.batch_sizes:
                x = torch.rand(b, 1, 28, 28, generator=g)
                ms = median_ms(lambda: fn(x), args.repeats)
                row["ms"][str(b)] = ms
                row["gflops"][str(b)] = flops * b / (ms * 1e-3) / 1e9
            rows.append(row)
    base = rows[0]["ms"]
    for row in rows:
        row["speedup"] = {b: base[b] / row["ms"][b] for b in base}
    out = {"command": " ".join(["python", "bench/sparse_kernels.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
           "artifact": args.artifact, "nnz": nnz, "widths_compact": model.widths, "rows": rows}
    results = ROOT / "bench" / "results"
    (results / "sparse_kernels.json").write_text(json.dumps(out, indent=2) + "\n")
    bsz = args.batch_sizes
    lines = [f"### Kernels for the compact LeNet-300-100 — `{out['command']}`", "",
             f"{out['machine']}; compact widths {'-'.join(map(str, model.widths))}, {nnz:,} non-zeros; "
             f"median of {args.repeats} samples.", "",
             "| kernel | FLOPs / sample | " + " | ".join(f"batch {b}: ms | speedup | GFLOP/s" for b in bsz) + " |",
             "|---|---:|" + "---:|---:|---:|" * len(bsz)]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['flops_per_sample']:,} | " + " | ".join(
            f"{r['ms'][str(b)]:.4f} | {r['speedup'][str(b)]:.2f}× | {r['gflops'][str(b)]:.1f}" for b in bsz) + " |")
    md = "\n".join(lines) + "\n"
    (results / "sparse_kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
