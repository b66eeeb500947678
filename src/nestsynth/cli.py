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
    r = sub.add_parser("report", help="print a run's per-layer table and redraw its plots")
    r.add_argument("run_dir")
    r.add_argument("--json", action="store_true", help="print report.json instead of the table")
    m = sub.add_parser("models", help="list the registered reference architectures")
    m.add_argument("--json", action="store_true")
    return p


def _overrides(args) -> list[str]:
    sets = []
    for key, value in (("model", args.model), ("data.dataset", args.dataset), ("seed", args.seed),
                       ("device", args.device)):
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if args.data_dir is not None:
        sets.append(f"data.data_dir={json.dumps(args.data_dir)}")
    return sets + list(args.set)


def default_run_dir(cfg) -> Path:
    name = f"{cfg.model}_{cfg.data.dataset}_seed{cfg.seed}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def cmd_synthesize(args) -> int:
    from .api import load_run_config, resolve_reference, run_synthesis
    from .data import load_dataset
    from .report import format_layer_table

    sets = _overrides(args)
    if args.resume:
        if not args.out:
            raise NestError("--resume needs --out RUN_DIR, the run to continue.")
        out = Path(args.out)
        cfg = load_run_config(out)
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
        _, report = run_synthesis(cfg, data, reference, out, resume=args.resume, progress=progress,
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nestsynth`` console script."""
    args = _parser().parse_args(argv)
    handlers = {"synthesize": cmd_synthesize, "report": cmd_report, "models": cmd_models}
    try:
        return handlers[args.command](args)
    except NestError as exc:
        print(f"nestsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
