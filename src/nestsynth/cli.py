"""The ``nestsynth`` command: thin parsing around the library.

Every user mistake ends with one sentence on stderr and exit status 2; Ctrl-C
leaves the last checkpoint in place and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import checkpoint as ckpt
from . import config as config_mod
from .errors import NestError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestsynth", description="NeST grow-and-prune network synthesis.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthesize", help="grow and prune a network, writing a run directory")
    _add_run_options(s)
    pr = sub.add_parser("prune", help="run a registered method (a baseline or nest) into a run directory")
    pr.add_argument("--method", required=True, help="registered method name (see nestsynth methods)")
    _add_run_options(pr)
    r = sub.add_parser("report", help="print a run's per-layer table and redraw its plots")
    r.add_argument("run_dir")
    r.add_argument("--json", action="store_true", help="print report.json instead of the table")
    m = sub.add_parser("models", help="list the registered reference architectures")
    m.add_argument("--json", action="store_true")
    me = sub.add_parser("methods", help="list the registered compression methods")
    me.add_argument("--json", action="store_true")
    c = sub.add_parser("compare", help="run several methods over several seeds and tabulate them")
    c.add_argument("--methods", required=True, help="comma-separated method names, e.g. nest,han,gradual")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1; default 3)")
    c.add_argument("--config", help="TOML config shared by every run ([train], [data], NeST's sections, "
                   "[methods.NAME])")
    c.add_argument("--model", help="registered model name or mlp:IN-H1-...-OUT")
    c.add_argument("--dataset", help="mnist, digits or npz:PATH")
    c.add_argument("--data-dir", help="folder holding the data set files")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    c.add_argument("--out", help="comparison directory (default: runs/compare_MODEL_DATASET)")
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    c.add_argument("--threads", type=int, default=0, help="intra-op threads per run (default: PyTorch's; "
                   "1 with --jobs > 1)")
    c.add_argument("--title", help="title of comparison.md and pareto.png")
    k = sub.add_parser("compress", help="Deep Compression (weight sharing + Huffman) of a finished run")
    k.add_argument("run_dir")
    k.add_argument("--bits", type=int, default=5, help="bits per shared-weight index (default 5)")
    k.add_argument("--index-bits", type=int, default=5, help="bits per relative sparse index (default 5)")
    k.add_argument("--conv-bits", type=int, help="bits per shared-weight index of conv layers (default: --bits; "
                   "Deep Compression used 8)")
    k.add_argument("--finetune-epochs", type=int, default=1, help="retraining epochs of the centroids (default 1)")
    k.add_argument("--data-dir", help="folder holding the data set files")
    k.add_argument("--json", action="store_true")
    _add_export_parsers(sub)
    return p


def _add_run_options(s) -> None:
    s.add_argument("--config", help="TOML config file (see configs/)")
    s.add_argument("--model", help="registered model name or mlp:IN-H1-...-OUT")
    s.add_argument("--dataset", help="mnist, digits or npz:PATH")
    s.add_argument("--data-dir", help="folder holding the data set files")
    s.add_argument("--out", help="run directory (default: runs/MODEL_DATASET_seedN)")
    s.add_argument("--seed", type=int, help="random seed")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set growth.alpha=0.5 (repeatable)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _overrides(args) -> list[str]:
    sets = []
    for key, value in (("model", args.model), ("data.dataset", args.dataset),
                       ("seed", getattr(args, "seed", None)), ("device", args.device),
                       ("method", getattr(args, "method", None))):
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if args.data_dir is not None:
        sets.append(f"data.data_dir={json.dumps(args.data_dir)}")
    return sets + list(args.set)


def default_run_dir(cfg) -> Path:
    prefix = "" if cfg.method == "nest" else f"{cfg.method}_"
    name = f"{prefix}{cfg.model}_{cfg.data.dataset}_seed{cfg.seed}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def cmd_synthesize(args) -> int:
    from .api import load_run_config, resolve_reference
    from .baselines.runner import run_method
    from .data import load_dataset
    from .report import format_layer_table

    sets = _overrides(args)
    if args.resume:
        if not args.out:
            raise NestError("--resume needs --out RUN_DIR, the run to continue.")
        out = Path(args.out)
        cfg = (load_run_config(out) if ckpt.checkpoint_path(out).is_file() or not ckpt.config_path(out).is_file()
               else config_mod.load(ckpt.config_path(out)))  # a baseline run has no checkpoint
        changed = config_mod.load(args.config, sets, base=cfg) if (args.config or sets) else cfg
        if changed.digest() != cfg.digest():
            raise NestError(f"--resume continues {str(out)!r} with its own config.toml; drop the other "
                            "options or start a new run.")
        cfg = changed
    else:
        cfg = config_mod.load(args.config, sets)
        out = Path(args.out) if args.out else default_run_dir(cfg)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir or None, val_fraction=cfg.data.val_fraction,
                        split_seed=cfg.data.split_seed)
    reference = resolve_reference(cfg.model, data)
    progress = not args.quiet and sys.stderr.isatty()

    shown = [0]

    def tell(state):
        if args.quiet or len(state.history) == shown[0]:
            return
        shown[0] = len(state.history)
        row = state.history[-1]
        if row:
            print(f"[{row['phase']} {row['iteration']}] weights {row['weights']} neurons {row['neurons']} "
                  f"val error {100 * row['val_error']:.2f}% ({row['seconds']:.1f} s)", flush=True)

    try:
        _, report = run_method(cfg, data, reference, out, resume=args.resume, progress=progress,
                               on_iteration=tell)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint is in {out}; continue with "
              f"nestsynth synthesize --out {out} --resume", file=sys.stderr)
        return 130
    print(format_layer_table(report))
    print(f"\nrun directory: {out}")
    return 0


def cmd_report(args) -> int:
    from .report import format_layer_table, redraw_plots

    run = Path(args.run_dir)
    path = ckpt.report_path(run)
    if not path.is_file():
        raise NestError(f"{str(run)!r} has no report.json: it is not a finished nestsynth run.")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise NestError(f"{str(path)!r} is not valid JSON.") from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_layer_table(report))
    for plot in redraw_plots(run):
        print(f"plot: {plot}")
    return 0


def cmd_models(args) -> int:
    from .registry import list_models

    rows = [{"name": m.name, "widths": list(m.widths), "weights": m.dense_weights(), "flops": m.dense_flops(),
             "description": m.description} for m in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<16}{'layers':<20}{'weights':>10}{'FLOPs':>10}  description")
    for r in rows:
        print(f"{r['name']:<16}{'-'.join(map(str, r['widths'])):<20}{r['weights']:>10}{r['flops']:>10}  "
              f"{r['description']}")
    print("\nAny MLP: mlp:IN-H1-...-OUT, e.g. mlp:784-500-250-10. Registered MLPs take their input and "
          "output widths from the data.")
    return 0


def cmd_methods(args) -> int:
    import dataclasses

    from .baselines import list_methods

    rows = [{"name": "nest", "description": "NeST: grow from a sparse seed, then prune (sections growth, pruning)",
             "options": []}]
    rows += [{"name": m.name, "description": m.description + (" [MLP only]" if getattr(m.run, "mlp_only", None)
                                                               else ""),
              "options": [f.name for f in dataclasses.fields(m.config)]} for m in list_methods()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<12}{r['description']}")
        if r["options"]:
            print(f"{'':<12}[methods.{r['name']}] {', '.join(r['options'])}")
    return 0


def cmd_compare(args) -> int:
    from .baselines.compare import plan, run_all, write_comparison

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds < 1:
        raise NestError(f"--seeds must be at least 1, got {args.seeds}.")
    if args.jobs < 1:
        raise NestError(f"--jobs must be at least 1, got {args.jobs}.")
    base = config_mod.load(args.config, _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / re.sub(
        r"[^A-Za-z0-9_.-]+", "-", f"compare_{base.model}_{base.data.dataset}")
    jobs = plan(base, methods, list(range(args.seeds)), out)
    title = args.title or f"{base.model} on {base.data.dataset}: {args.seeds} seeds per method"
    try:
        reports, failures = run_all(jobs, None, args.jobs, args.threads,
                                    tell=print)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {out}; run the same command to continue",
              file=sys.stderr)
        return 130
    paths = write_comparison(reports, jobs, out, title, failures)
    print(paths[0].read_text())
    for p in paths:
        print(f"wrote {p}")
    if failures:
        raise NestError(f"{len(failures)} of {len(jobs)} runs failed (listed in {paths[0]}).")
    return 0


def cmd_compress(args) -> int:
    from .compress.pipeline import compress_run

    result = compress_run(Path(args.run_dir), bits=args.bits, index_bits=args.index_bits,
                          finetune_epochs=args.finetune_epochs, data_dir=args.data_dir, conv_bits=args.conv_bits)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from .compress.pipeline import format_compression
    print(format_compression(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nestsynth`` console script."""
    args = _parser().parse_args(argv)
    handlers = {"synthesize": cmd_synthesize, "prune": cmd_synthesize, "report": cmd_report,
                "models": cmd_models, "methods": cmd_methods, "compare": cmd_compare, "compress": cmd_compress}
    handlers.update(EXPORT_HANDLERS)
    try:
        return handlers[args.command](args)
    except NestError as exc:
        print(f"nestsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- export, evaluate, bench-infer


def _add_export_parsers(sub) -> None:
    e = sub.add_parser("export", help="write the compact model of a run (pruned neurons removed, BN folded)")
    e.add_argument("run_dir", help="a finished run directory (or a model.pt file)")
    e.add_argument("--format", default="pytorch", choices=["pytorch", "safetensors", "onnx"],
                   help="artifact format (default pytorch; onnx is always stored dense)")
    e.add_argument("--sparse", default="auto", choices=["auto", "dense", "csr"],
                   help="per-layer storage: auto measures dense vs CSR at --batch-size (default auto)")
    e.add_argument("--out", help="artifact path (default RUN_DIR/export/compact.pt|.safetensors|.onnx)")
    e.add_argument("--batch-size", type=int, default=1, help="batch size the auto decision is timed at (default 1)")
    e.add_argument("--dataset", help="data set of the output check (default: the run's)")
    e.add_argument("--data-dir", help="folder holding the data set files")
    e.add_argument("--check", default="test", choices=["test", "random"],
                   help="inputs of the compact-vs-masked check: the test set or 2048 random inputs")
    e.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |compact - masked| output")
    e.add_argument("--threads", type=int, help="intra-op threads for the timing (default: PyTorch's)")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    v = sub.add_parser("evaluate", help="test error of an exported model (.pt, .safetensors or .onnx)")
    v.add_argument("artifact")
    v.add_argument("--dataset", help="mnist, digits or npz:PATH (default: the one recorded in the artifact)")
    v.add_argument("--data-dir", help="folder holding the data set files")
    v.add_argument("--json", action="store_true")
    b = sub.add_parser("bench-infer", help="inference latency: dense reference, masked, compact, ONNX")
    b.add_argument("artifact", help="a compact .pt or .safetensors model from nestsynth export")
    b.add_argument("--run", help="run directory of the masked model (default: the one the artifact records)")
    b.add_argument("--onnx", help="ONNX export to time (default: sibling .onnx, else converted in memory)")
    b.add_argument("--batch-sizes", default="1,64,256", help="comma-separated (default 1,64,256)")
    b.add_argument("--repeats", type=int, default=30, help="timed samples per measurement (default 30)")
    b.add_argument("--warmup", type=int, default=10, help="warm-up calls before timing (default 10)")
    b.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    b.add_argument("--out", help="inference.json path (default: beside the artifact)")
    b.add_argument("--json", action="store_true")


def cmd_export(args) -> int:
    from .export.pipeline import export_run, format_export

    result = export_run(args.run_dir, args.format, args.sparse, args.out, args.batch_size, args.dataset,
                        args.data_dir, args.tolerance, args.check, args.threads)
    print(json.dumps(result, indent=2) if args.json else format_export(result))
    return 0


def cmd_evaluate(args) -> int:
    from .export.pipeline import evaluate_artifact

    result = evaluate_artifact(args.artifact, args.dataset, args.data_dir)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['artifact']}: test error {100 * result['test_error']:.2f}% ({result['errors']} of "
              f"{result['samples']}, {result['dataset']})")
    return 0


def cmd_bench_infer(args) -> int:
    from .export.pipeline import bench_inference, format_inference_table

    try:
        sizes = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
    except ValueError:
        raise NestError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}.") from None
    if not sizes or min(sizes) < 1:
        raise NestError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}.")
    result = bench_inference(args.artifact, args.run, args.onnx, sizes, args.repeats, args.warmup, args.threads,
                             args.out)
    print(json.dumps(result, indent=2) if args.json else format_inference_table(result))
    return 0


EXPORT_HANDLERS = {"export": cmd_export, "evaluate": cmd_evaluate, "bench-infer": cmd_bench_infer}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
