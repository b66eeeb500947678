"""The ``nestsynth`` command: thin parsing around the library.

Every user mistake ends with one sentence on stderr and exit status 2; Ctrl-C
leaves the last checkpoint in place and exits with 130, SIGTERM the same with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt
from . import config as config_mod
from . import distributed
from .errors import NestError


DATASET_HELP = "mnist, digits, cifar10 or npz:PATH (an .npz file holding X and y, optionally X_test and y_test)"
DEVICE_HELP = "where to train: auto (cuda when available), cpu, cuda or cuda:N"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nestsynth")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def _device(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; valid: auto, cpu, cuda or cuda:N")
    return text


def _polish(sub) -> None:
    """What every subcommand shares, applied once to all of them (those added later included):
    a description (its help as a sentence), one help text for --dataset, --device accepting cuda:N."""
    for choice in sub._choices_actions:
        parser = sub.choices[choice.dest]
        if not parser.description and choice.help:
            parser.description = choice.help[0].upper() + choice.help[1:] + "."
        for action in parser._actions:
            if "--dataset" in action.option_strings:
                action.help = DATASET_HELP + {"evaluate": " (default: the one recorded in the artifact)",
                                              "export": "; the output check's (default: the run's)"
                                              }.get(choice.dest, "")
            if "--device" in action.option_strings:
                action.choices, action.type, action.help, action.metavar = None, _device, DEVICE_HELP, "DEVICE"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestsynth", description="NeST grow-and-prune network synthesis.")
    p.add_argument("--version", action="version", version=f"nestsynth {_version()}")
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
    c = sub.add_parser("compare", help="run several methods over several seeds (and sizes) and tabulate them")
    c.add_argument("--methods", required=True, help="comma-separated method names, e.g. nest,han,gradual")
    c.add_argument("--sizes", help="comma-separated target sizes in active weights, e.g. 3000,5000,8000: every "
                   "method runs at every size (error-size curves: curves.csv, curves.md, curves.png)")
    c.add_argument("--epochs", type=int, help="with --sizes: the epoch budget of every run (NeST's included)")
    _add_batch_options(c, "comparison directory (default: runs/compare_MODEL_DATASET)",
                       "title of comparison.md and pareto.png (curves.md and curves.png with --sizes)")
    w = sub.add_parser("sweep", help="one synthesis per value of a config key, e.g. seed_net.ratio (paper Figs. 6-7)")
    w.add_argument("--values", required=True, metavar="KEY=V1,V2,...",
                   help="the config key and its values, e.g. seed_net.ratio=0.2,0.4,0.6,0.8,1.0")
    _add_batch_options(w, "sweep directory (default: runs/sweep_KEY)", "title of sweep.png")
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
    _polish(sub)
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
    s.add_argument("--quiet", action="store_true",
                   help="print only the final summary: no progress bars, no per-iteration or phase lines")


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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The run's progress on stdout, one line per iteration, terminal or not (the ``on_iteration``
    callback of :func:`~nestsynth.baselines.runner.run_method`).

    A NeST run (called with its LoopState) also gets a line when a phase starts and, per
    growth or pruning iteration, the elapsed time and an upper bound on what the phase has
    left (its remaining iteration limit times the mean seconds per iteration so far).  A
    baseline (called with its RunContext) gets the elapsed time.  ``quiet`` prints nothing.
    """

    def __init__(self, cfg, quiet: bool = False, resume: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.shown = None if resume else 0  # resumed: the rows before the first call were shown before
        self.phase = None
        self.started = time.monotonic()

    def __call__(self, state) -> None:
        if self.quiet:
            return
        rows = state.history
        if self.shown is None:
            self.shown = max(len(rows) - 1, 0)
        for row in rows[self.shown:]:
            print(self.line(row, state), flush=True)
        self.shown = len(rows)
        phase = getattr(state, "phase", None)
        if phase is not None and phase != self.phase:
            self.phase = phase
            start = self.phase_start(state)
            if start:
                print(start, flush=True)

    def line(self, row: dict, state) -> str:
        text = (f"[{row['phase']} {row['iteration']}] weights {row['weights']} neurons {row['neurons']} "
                f"val error {100 * row['val_error']:.2f}%")
        if row.get("accepted") is False:
            text += " (rejected: back to the last kept model)"
        if not hasattr(state, "phase"):  # a baseline: its rows carry the time since its start
            return text + f"; elapsed {_duration(time.monotonic() - self.started)}"
        text += f" ({row['seconds']:.1f} s); elapsed {_duration(state.elapsed)}"
        left = self.phase_left(row, state)
        return text + (f", {row['phase']} at most {_duration(left[0])} more ({_n(left[1], 'iteration')} left "
                       "at most)" if left else "")

    def phase_left(self, row: dict, state) -> tuple[float, int] | None:
        """(upper bound on the seconds, iterations) the row's phase has left, if it goes on."""
        limit = {"growth": self.cfg.growth.max_iterations,
                 "pruning": getattr(state, "prune_iterations", 0) or self.cfg.pruning.max_iterations}
        if row["phase"] not in limit or state.phase != row["phase"]:
            return None
        done = [r["seconds"] for r in state.history if r["phase"] == row["phase"]]
        remaining = max(limit[row["phase"]] - (row["iteration"] + 1), 0)
        return (remaining * sum(done) / len(done), remaining) if remaining else None

    def phase_start(self, state) -> str:
        g, p = self.cfg.growth, self.cfg.pruning
        target = f", ending early once the validation error reaches {100 * state.target:.2f}%" \
            if state.target is not None else ""
        bound = f" while the validation error stays within {100 * state.bound:.2f}%" if state.bound is not None \
            else ""
        prune = getattr(state, "prune_iterations", 0) or p.max_iterations
        return {"dense": f"dense reference: training {_n(self.cfg.dense.epochs, 'epoch')}...",
                "growth": f"growth: up to {_n(g.max_iterations, 'iteration')} of "
                          f"{_n(g.epochs_per_iteration, 'epoch')}{target}...",
                "pruning": f"pruning: up to {_n(prune, 'iteration')} of {_n(p.retrain_epochs, 'retraining epoch')}"
                           f"{bound}...",
                "finetune": f"fine-tuning the kept model: {_n(p.final_epochs, 'epoch')}..." if p.final_epochs else "",
                }.get(state.phase, "")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _check_device_and_size(device: str, reference) -> None:
    """Refuse a CUDA index this machine lacks, or a model that cannot fit in memory, before
    anything is allocated or written.

    The estimate counts 6 float32 values per dense reference weight (weight, mask, gradient,
    two Adam moments and the kept copy): a lower bound of what training needs.
    """
    import torch

    from .data.base import available_memory, check_fits
    from .metrics import reference_weights

    available = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        count = torch.cuda.device_count()
        if index >= count:
            raise NestError(f"device {device!r} does not exist: this machine has {count} CUDA device"
                            f"{'s' * (count != 1)} (cuda:0..cuda:{count - 1}).")
        available = torch.cuda.mem_get_info(index)[0]
    weights = reference_weights(reference)
    check_fits(24 * weights, f"the model ({weights:,} weights in its dense reference)",
               "choose smaller widths (nestsynth models lists the registered ones)",
               available if available is not None else available_memory())


_SIGNAL = {"terminated": False}


def _on_sigterm(signum, frame) -> None:
    """SIGTERM: stop like Ctrl-C (the last checkpoint stays; exit status 143)."""
    if not _SIGNAL["terminated"]:  # a second SIGTERM during the clean-up is ignored
        _SIGNAL["terminated"] = True
        raise KeyboardInterrupt


def _rank_tag() -> str:
    """" (rank N)" for a process other than rank 0 under torchrun, else ""."""
    d = distributed.current()
    return f" (rank {d.rank})" if d.active and not d.is_main else ""


def _stop_word() -> str:
    return "terminated (SIGTERM)" if _SIGNAL["terminated"] else "interrupted"


def cmd_synthesize(args) -> int:
    from .api import load_run_config, resolve_reference
    from .baselines.runner import run_method
    from .data import load_dataset
    from .report import format_layer_table, format_outcome

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
        ckpt.check_can_write(out, "--out", directory=True)
    dist = distributed.init_from_env(cfg.device)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir or None, val_fraction=cfg.data.val_fraction,
                        split_seed=cfg.data.split_seed)
    reference = resolve_reference(cfg.model, data)
    _check_device_and_size(distributed.run_device(cfg.device), reference)
    quiet = args.quiet or not dist.is_main  # under torchrun rank 0 alone prints and writes
    tell = Progress(cfg, quiet, resume=args.resume)
    if args.resume and not quiet:
        print(f"resuming {out} from its last checkpoint", flush=True)
    elif cfg.method != "nest" and not quiet:  # a baseline's first row may come after a long dense phase
        print(f"{cfg.method}: running; a line follows each step it logs...", flush=True)
    if dist.active and not quiet:
        print(f"{dist.world_size} processes ({dist.backend}): a total batch of {cfg.train.batch_size}, "
              f"{cfg.train.batch_size / dist.world_size:g} per process, learning rate {cfg.train.lr:g}", flush=True)
    try:
        with ckpt.run_lock(out) if dist.is_main else contextlib.nullcontext():
            _, report = run_method(cfg, data, reference, out, resume=args.resume,
                                   progress=not quiet and sys.stderr.isatty(), on_iteration=tell)
    except KeyboardInterrupt:
        method = f" --method {cfg.method}" if args.command == "prune" else ""
        if dist.is_main:
            print(f"{_stop_word()}: the last checkpoint is in {out}; continue with nestsynth {args.command}"
                  f"{method} --out {out} --resume", file=sys.stderr)
        return 130
    if not dist.is_main:
        return 0
    print(format_layer_table(report))
    outcome = format_outcome(report, ckpt.read_jsonl(ckpt.metrics_path(out)), cfg.pruning.max_iterations)
    if outcome:
        print("\n" + outcome)
    print(f"\nrun directory: {out}")
    return 0


def cmd_report(args) -> int:
    from .report import format_layer_table, format_outcome, read_history, read_report, redraw_plots

    run = Path(args.run_dir)
    report = read_report(run)  # every file is checked before anything is printed
    history = read_history(run)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        try:
            limit = config_mod.load(ckpt.config_path(run)).pruning.max_iterations
        except NestError:  # no or an unreadable config.toml: the limit goes unnamed
            limit = None
        outcome = format_outcome(report, history, limit)
        print(format_layer_table(report) + ("\n\n" + outcome if outcome else ""))
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
    table = [("name", "layers", "weights", "FLOPs", "description")] + [
        (r["name"], _runs(r["widths"]), f"{r['weights']:,}", f"{r['flops']:,}", r["description"])
        for r in rows]
    w = [max(len(row[i]) for row in table) for i in range(4)]
    for name, layers, weights, flops, description in table:
        print(f"{name:<{w[0]}}  {layers:<{w[1]}}  {weights:>{w[2]}}  {flops:>{w[3]}}  {description}")
    print("\nlayers: units per layer, input first; WxN is N layers of W units. Any MLP: mlp:IN-H1-...-OUT, "
          "e.g. mlp:784-500-250-10. Registered MLPs take their input and output widths from the data.")
    return 0


def _runs(widths) -> str:
    """Widths joined by '-', a run of N equal widths written WxN (3-64x2-128x2-...)."""
    parts = []
    for w in widths:
        if parts and parts[-1][0] == w:
            parts[-1][1] += 1
        else:
            parts.append([w, 1])
    return "-".join(f"{w}x{n}" if n > 1 else str(w) for w, n in parts)


def cmd_methods(args) -> int:
    import dataclasses

    from .baselines import list_methods

    def marks(run) -> str:
        return "".join(f" [{label}]" for attr, label in (("mlp_only", "MLP only"), ("chain_only", "chain only"))
                       if getattr(run, attr, None))

    rows = [{"name": m.name, "description": m.description + marks(m.run),
             "options": [f.name for f in dataclasses.fields(m.config)] if m.config is not None else []}
            for m in list_methods()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<12}{r['description']}")
        if r["options"]:
            print(f"{'':<12}[methods.{r['name']}] {', '.join(r['options'])}")
    return 0


def _add_batch_options(c, out_help: str, title_help: str) -> None:
    """Options shared by compare and sweep (many runs under one config)."""
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1; default 3)")
    c.add_argument("--first-seed", type=int, default=0,
                   help="seeds FIRST..FIRST+N-1 instead (add a seed to an earlier run; default 0)")
    c.add_argument("--config", help="TOML config shared by every run ([train], [data], NeST's sections, "
                   "[methods.NAME])")
    c.add_argument("--model", help="registered model name or mlp:IN-H1-...-OUT")
    c.add_argument("--dataset", help="mnist, digits, cifar10 or npz:PATH")
    c.add_argument("--data-dir", help="folder holding the data set files")
    c.add_argument("--device", help="where to train: auto, cpu, cuda or cuda:N")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    c.add_argument("--out", help=out_help)
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    c.add_argument("--threads", type=int, default=0, help="intra-op threads per run (default: PyTorch's; "
                   "1 with --jobs > 1)")
    c.add_argument("--title", help=title_help)


def _batch_base(args):
    if args.seeds < 1:
        raise NestError(f"--seeds must be at least 1, got {args.seeds}.")
    if args.first_seed < 0:
        raise NestError(f"--first-seed must be 0 or more, got {args.first_seed}.")
    if args.jobs < 1:
        raise NestError(f"--jobs must be at least 1, got {args.jobs}.")
    return config_mod.load(args.config, _overrides(args))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NestError(f"{option} must be comma-separated whole numbers, got {text!r}.") from None
    if not values or min(values) < 1:
        raise NestError(f"{option} must be positive whole numbers, got {text!r}.")
    return values


def _dense_weights(base) -> int:
    """Weights of the dense reference fitted to the configured data (for --sizes)."""
    from .api import resolve_reference
    from .data import load_dataset

    data = load_dataset(base.data.dataset, base.data.data_dir or None, val_fraction=base.data.val_fraction,
                        split_seed=base.data.split_seed)
    return resolve_reference(base.model, data).dense_weights()


def _run_batch(jobs, args, out: Path, device: str, write=None):
    """Run the jobs (under torchrun: all processes share each run, one run after another);
    returns (finished, failures), on processes other than rank 0 (which write nothing) None.
    ``write(finished, failures)`` (the tables of the batch; returns their paths) is called on
    an interrupt too, with the runs finished so far, before the process exits with 130."""
    from .baselines.compare import run_all

    dist = distributed.init_from_env(device)
    if dist.active and args.jobs > 1:
        raise NestError("--jobs runs several processes of its own; under torchrun the processes share each run, "
                        "so drop --jobs (the runs go one after another).")
    try:
        result = run_all(jobs, None, args.jobs, args.threads, tell=print if dist.is_main else lambda line: None)
        return result if dist.is_main else None
    except KeyboardInterrupt as exc:
        if dist.is_main:
            finished, failures = getattr(exc, "finished", []), getattr(exc, "failures", [])
            if write is not None and finished:
                missing = len(jobs) - len(finished) - len(failures)
                paths = write(finished, [*failures, f"{missing} of {len(jobs)} runs did not finish "
                                         "(stopped; the same command continues them)"])
                print(f"\nwrote the tables of the {len(finished)} finished runs: {', '.join(map(str, paths))}",
                      file=sys.stderr)
            print(f"\n{_stop_word()}: finished runs are kept in {out}; run the same command to continue",
                  file=sys.stderr)
        raise SystemExit(130) from None


def _report_batch(paths: list[Path], failures: list[str], n_jobs: int, show: Path | None) -> int:
    if show is not None:
        print(show.read_text())
    for p in paths:
        print(f"wrote {p}")
    if failures:
        raise NestError(f"{len(failures)} of {n_jobs} runs failed: {failures[0]}")
    return 0


def cmd_compare(args) -> int:
    from .baselines.compare import plan, write_comparison, write_curves

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = _batch_base(args)
    sizes = _int_list(args.sizes, "--sizes") if args.sizes else None
    if args.epochs is not None and (args.epochs < 1 or sizes is None):
        raise NestError("--epochs must be a positive number of epochs, given with --sizes.")
    out = Path(args.out) if args.out else Path("runs") / re.sub(
        r"[^A-Za-z0-9_.-]+", "-", f"compare_{base.model}_{base.data.dataset}")
    dense = _dense_weights(base) if sizes else None
    jobs = plan(base, methods, list(range(args.first_seed, args.first_seed + args.seeds)), out, sizes, args.epochs, dense)
    title = args.title or f"{base.model} on {base.data.dataset}: {args.seeds} seeds per method" + \
        (f", {args.epochs} epochs per run" if args.epochs else "")
    write = (lambda done, failed: write_curves(done, jobs, out, title, failed)) if sizes else \
        (lambda done, failed: write_comparison(done, jobs, out, title, failed))
    batch = _run_batch(jobs, args, out, base.device, write)
    if batch is None:
        return 0
    finished, failures = batch
    paths = write(finished, failures)
    return _report_batch(paths, failures, len(jobs), paths[1] if sizes else paths[0])


def cmd_sweep(args) -> int:
    from .baselines.compare import plan_sweep, write_sweep

    key, sep, text = args.values.partition("=")
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise NestError(f"--values expects KEY=V1,V2,... (e.g. seed_net.ratio=0.2,0.6,1.0), got {args.values!r}.")
    key = key.strip()
    base = _batch_base(args)
    out = Path(args.out) if args.out else Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"sweep_{key}")
    jobs = plan_sweep(base, key, values, list(range(args.first_seed, args.first_seed + args.seeds)), out)
    title = args.title or f"{base.model} on {base.data.dataset}: {key} sweep, {args.seeds} seeds"
    def write(done, failed):
        return write_sweep(done, jobs, key, out, title, failed)

    batch = _run_batch(jobs, args, out, base.device, write)
    if batch is None:
        return 0
    finished, failures = batch
    paths = write(finished, failures)
    return _report_batch(paths, failures, len(jobs), paths[0])


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
                "models": cmd_models, "methods": cmd_methods, "compare": cmd_compare, "sweep": cmd_sweep, "compress": cmd_compress}
    handlers.update(EXPORT_HANDLERS)
    _SIGNAL["terminated"] = False
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        code = handlers[args.command](args)
    except NestError as exc:
        if distributed.speaks(exc):
            print(f"nestsynth{_rank_tag()}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        if distributed.current().is_main:
            print(_stop_word(), file=sys.stderr)
        code = 130
    except SystemExit as exc:  # a handler that exits by itself after an interrupt (130)
        if exc.code != 130:
            raise
        code = 130
    except OSError as exc:  # a path the user gave that cannot be read or written
        where = f" {str(exc.filename)!r}" if exc.filename else ""
        print(f"nestsynth: error: cannot read or write{where}: {exc.strerror or exc}.", file=sys.stderr)
        code = 2
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not re.search(r"out of memory|can't allocate memory", str(exc)):
            if not distributed.current().active:
                raise
            # under torchrun: a collective failed, most often because another process stopped
            print(f"nestsynth{_rank_tag()}: error: stopping because another process of this launch stopped or "
                  f"a collective failed ({distributed.failure_words(exc)}).", file=sys.stderr)
            return 1
        print("nestsynth: error: ran out of memory; choose smaller widths, train.batch_size or "
              "train.eval_batch_size.", file=sys.stderr)
        code = 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()
    return 143 if code == 130 and _SIGNAL["terminated"] else code


# ----------------------------------------------------------------------------- export, evaluate, bench-infer


def _add_export_parsers(sub) -> None:
    e = sub.add_parser("export", help="write the compact model of a run (pruned neurons removed, BN folded)")
    e.add_argument("run_dir", help="a finished run directory (or a model.pt file)")
    e.add_argument("--format", default="pytorch", choices=["pytorch", "safetensors", "onnx", "c"],
                   help="artifact format (default pytorch; onnx is always stored dense; c: dependency-free C "
                        "source of the forward pass with a stdin harness under -DNEST_MAIN)")
    e.add_argument("--sparse", default="auto", choices=["auto", "dense", "csr", "ckernel"],
                   help="per-layer storage: auto measures dense, CSR and the generated C kernel at --batch-size "
                        "(default auto); ckernel: every layer in generated C")
    e.add_argument("--compile-check", default="auto", choices=["auto", "require", "skip"],
                   help="--format c: compile the source and check its outputs (auto: when a C compiler is found; "
                        "require: refuse without one)")
    e.add_argument("--out", help="artifact path (default RUN_DIR/export/compact.pt|.safetensors|.onnx|.c)")
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
    b = sub.add_parser("bench-infer", help="inference latency: dense reference, masked, compact, C kernel, ONNX")
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
                        args.data_dir, args.tolerance, args.check, args.threads, args.compile_check)
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
