"""``nestsynth compare`` and ``nestsynth sweep``: many runs in one harness, then tables.

``compare`` runs every method x every seed (``OUT/METHOD/seedN``, comparison.md), or with
``--sizes`` every method x size x seed (``OUT/METHOD/sizeS/seedN``, curves.csv/md/png): each
method is told the size through its own knob (:func:`size_overrides`) and, with
``--epochs``, the same epoch budget.  ``sweep`` runs one synthesis per value of a config
key (``OUT/KEY=VALUE/seedN``, sweep.csv/png).  A directory that already holds a finished
run of the same config (same digest) is reused, an unfinished one is continued
(NeST from its checkpoint, a baseline from its start), so an interrupted comparison
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .. import checkpoint as ckpt
from .. import config as config_mod
from ..config import Config
from ..distributed import current
from ..errors import NestError
from .registry import get_method, method_names
from .runner import is_finished


@dataclasses.dataclass
class Job:
    method: str
    seed: int
    run_dir: Path
    cfg_toml: str
    size: int | None = None  # compare --sizes: the target size in active weights
    value: str | None = None  # sweep: the swept key's value

    @property
    def key(self) -> tuple:
        return self.method, self.size, self.value, self.seed

    @property
    def label(self) -> str:
        parts = [self.method] + ([f"size {self.size}"] if self.size is not None else []) + \
            ([self.value] if self.value is not None else [])
        return f"{', '.join(parts)}, seed {self.seed}"


# methods whose size is one sparsity over all weights, with the epoch fields to set for a budget E
_SPARSITY_KEYS = {"random": "sparsity", "snip": "sparsity", "grasp": "sparsity", "oneshot": "sparsity",
                  "gradual": "final_sparsity"}


def size_overrides(method: str, size: int | None, dense_weights: int, epochs: int | None,
                   base: Config) -> dict:
    """The config changes that make ``method`` end at ``size`` active weights within ``epochs``.

    NeST gets ``pruning.target_weights`` (and ``budget_epochs``; growth is capped at
    ``growth.max_epochs``, a fifth of the budget when the config leaves it open); gradual,
    oneshot, random, SNIP and GraSP a sparsity of ``1 - size / dense_weights``; L0 its
    ``target_weights``.  ``dense`` (size None) is trained for the budget as the reference.
    Methods whose own rule decides the size (han, lottery, sensitivity, lobs, n2ps, radix)
    are refused.

    Raises:
        NestError: a method without a size knob, or a size outside (0, dense_weights).
    """
    if method == "dense":
        return {"methods": {"dense": {"epochs": epochs}}} if epochs else {}
    if size is None or not 0 < size < dense_weights:
        raise NestError(f"size {size} is out of range; it must be between 1 and the dense reference's "
                        f"{dense_weights - 1:,} weights.")
    if method == "nest":
        p: dict = {"target_weights": size}
        out = {"pruning": p}
        if epochs:
            p["budget_epochs"] = epochs
            if base.growth.max_epochs == 0:
                out["growth"] = {"max_epochs": max(1, epochs // 5)}
        return out
    if method == "l0":
        return {"methods": {"l0": {"target_weights": size, **({"epochs": epochs} if epochs else {})}}}
    if method not in _SPARSITY_KEYS:
        raise NestError(f"method {method} has no size target (its own rule decides the size); compare it "
                        "without --sizes, or choose among nest, gradual, l0, oneshot, random, snip, grasp, dense.")
    m = {_SPARSITY_KEYS[method]: 1.0 - size / dense_weights}
    if epochs:
        m.update(_budget_fields(method, epochs, base))
    return {"methods": {method: m}}


def _budget_fields(method: str, epochs: int, base: Config) -> dict:
    """Epoch fields of a sparsity method for a budget of ``epochs`` in all."""
    if method == "oneshot":
        dense = max(1, epochs // 3)
        return {"dense_epochs": dense, "finetune_epochs": epochs - dense}
    if method == "gradual":  # the schedule ends two thirds in, as in the shipped comparison (40 of 60)
        g = base.methods.gradual
        begin = min(g.begin_epoch, max(0, epochs // 10))
        return {"epochs": epochs - g.dense_epochs, "begin_epoch": begin,
                "end_epoch": max(begin + 1, round(2 * (epochs - g.dense_epochs) / 3))}
    return {"epochs": epochs}


def plan(base: Config, methods: list[str], seeds: list[int], out: Path, sizes: list[int] | None = None,
         epochs: int | None = None, dense_weights: int | None = None) -> list[Job]:
    """One job per (method, seed), or per (method, size, seed) with ``sizes``; configs are
    validated before anything runs.

    Args:
        sizes: target sizes in active weights (``compare --sizes``); ``dense`` runs once per seed.
        epochs: the epoch budget every method gets (None: each method's own, as configured).
        dense_weights: the dense reference's weights (needed with ``sizes``).

    Raises:
        NestError: unknown method, empty lists, a method without a size target, or a run
            directory holding another config.
    """
    known = method_names()
    bad = [m for m in methods if m not in known]
    if bad:
        raise NestError(f"unknown method {bad[0]!r}; known methods: {', '.join(known)}.")
    if not methods or not seeds:
        raise NestError("compare needs at least one method and one seed.")
    from ..registry import get_model
    from .context import check_supported
    reference = get_model(base.model)
    for m in methods:  # refuse a method that cannot run on the model before anything runs
        check_supported(get_method(m), reference)
    jobs = []
    for m in methods:
        for size in ([None] if sizes is None or m == "dense" else sizes):
            for s in seeds:
                cfg = config_mod.from_dict({"method": m, "seed": s}, base)
                if sizes is not None:
                    cfg = config_mod.from_dict(size_overrides(m, size, dense_weights, epochs, cfg), cfg)
                elif epochs and m != "nest":
                    raise NestError("--epochs needs --sizes (each method's budget is set with its size).")
                run_dir = out / m / (f"size{size}" if size is not None else "") / f"seed{s}"
                jobs.append(_job(cfg, run_dir, m, s, size=size))
    return jobs


def _job(cfg: Config, run_dir: Path, method: str, seed: int, **extra) -> Job:
    existing = ckpt.config_path(run_dir)
    if existing.is_file() and config_mod.load(existing).digest() != cfg.digest():
        raise NestError(f"{str(run_dir)!r} holds a run of another config; choose another --out "
                        "or remove that directory.")
    return Job(method, seed, run_dir, cfg.to_toml(), **extra)


def plan_sweep(base: Config, key: str, values: list[str], seeds: list[int], out: Path) -> list[Job]:
    """One synthesis per (value of ``key``, seed): ``OUT/KEY=VALUE/seedN``.

    Raises:
        NestError: an unknown key, a bad value (checked for every value before anything
            runs), or a run directory holding another config.
    """
    if not values:
        raise NestError("sweep needs at least one value and one seed.")
    return plan_variants(base, {v: [f"{key}={v}"] for v in values}, seeds, out,
                         {v: f"{key}={v}" for v in values})


def plan_variants(base: Config, variants: dict[str, list[str]], seeds: list[int], out: Path,
                  dirs: dict[str, str] | None = None) -> list[Job]:
    """One run per (variant, seed): a variant is a name and its ``key=value`` overrides
    (an ablation, or one value of a sweep); runs go to ``OUT/NAME/seedN``.

    Raises:
        NestError: an unknown key or a bad value (every variant is checked before anything
            runs), no seeds, or a run directory holding another config.
    """
    if not variants or not seeds:
        raise NestError("sweep needs at least one value and one seed.")
    jobs = []
    for name, overrides in variants.items():
        for s in seeds:
            cfg = config_mod.load(None, [*overrides, f"seed={s}"], base=base)
            folder = re.sub(r"[^A-Za-z0-9_.=-]+", "-", (dirs or {}).get(name, name))
            jobs.append(_job(cfg, out / folder / f"seed{s}", cfg.method, s, value=name))
    return jobs


def _run_job(job: Job, data_dir: str | None, threads: int) -> dict:
    """Run (or reuse) one job in a worker process; returns its report."""
    import torch

    from ..api import resolve_reference
    from ..data import load_dataset
    from .runner import run_method

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = config_mod.from_dict(config_mod.tomllib.loads(job.cfg_toml))
    if data_dir:
        cfg = config_mod.from_dict({"data": {"data_dir": data_dir}}, cfg)
    dist = current()
    dist.barrier()  # under torchrun: rank 0 has written the last job before any rank reads
    if is_finished(job.run_dir, cfg):
        return {"reused": True, **json.loads(ckpt.report_path(job.run_dir).read_text())}
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir or None, val_fraction=cfg.data.val_fraction,
                        split_seed=cfg.data.split_seed)
    reference = resolve_reference(cfg.model, data)
    resume = ckpt.config_path(job.run_dir).is_file()
    dist.barrier()  # every rank has read the directory before rank 0 changes it
    if resume and get_method(cfg.method).checkpointed and not ckpt.checkpoint_path(job.run_dir).is_file():
        resume = False
        if dist.is_main:
            ckpt.config_path(job.run_dir).unlink()
        dist.barrier()
    _, report = run_method(cfg, data, reference, job.run_dir, resume=resume)
    return {"reused": False, **report}


def run_all(jobs: list[Job], data_dir: str | None = None, workers: int = 1, threads: int = 0,
            tell=print) -> tuple[list[tuple[Job, dict]], list[str]]:
    """Run the jobs (``workers`` processes at a time); returns ((job, report) of every
    finished job in job order, failures). An interrupt (KeyboardInterrupt) propagates with
    the jobs finished so far and the failures attached as ``finished`` and ``failures``."""
    reports, failures = {}, []
    try:
        _run_jobs(jobs, data_dir, workers, threads, tell, reports, failures)
    except KeyboardInterrupt as exc:
        exc.finished, exc.failures = _in_job_order(jobs, reports), failures
        raise
    return _in_job_order(jobs, reports), failures


def _in_job_order(jobs: list[Job], reports: dict) -> list[tuple[Job, dict]]:
    return [(j, reports[j.key]) for j in jobs if j.key in reports]


def _run_jobs(jobs: list[Job], data_dir: str | None, workers: int, threads: int, tell,
              reports: dict, failures: list[str]) -> None:

    def done(job, result=None, error=None):
        if error is not None:
            failures.append(f"{job.label}: {error}")
            tell(f"[{job.label}] failed: {error}")
            return
        reports[job.key] = result
        err = result.get("test_error")
        tell(f"[{job.label}] {'reused' if result['reused'] else 'done'} ({len(reports)}/{len(jobs)}): "
             f"{result['weights']['final']} weights, test error "
             f"{'-' if err is None else f'{100 * err:.2f}%'} ({result.get('wall_seconds', 0):.0f} s)")

    if workers <= 1:
        for job in jobs:
            try:
                done(job, _run_job(job, data_dir, threads))
            except NestError as exc:
                done(job, error=str(exc))
    else:
        import multiprocessing as mp
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        try:
            futures = {pool.submit(_run_job, job, data_dir, threads or 1): job for job in jobs}
            for fut in as_completed(futures):
                try:
                    done(futures[fut], fut.result())
                except NestError as exc:
                    done(futures[fut], error=str(exc))
        except KeyboardInterrupt:
            # a signal to this process alone (SIGTERM from a scheduler) would otherwise wait for the
            # running runs and start the queued ones: stop them (each keeps its last checkpoint)
            procs = list((getattr(pool, "_processes", None) or {}).values())
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(10)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()


def write_comparison(finished: list[tuple[Job, dict]], jobs: list[Job], out: Path, title: str,
                     failures: list[str] = ()) -> list[Path]:
    """comparison.md, comparison.csv and pareto.png in ``out``."""
    from ..report.comparison import format_csv, format_markdown, plot_pareto, run_row

    rows = [run_row(r, _relative(j.run_dir, out)) for j, r in finished]
    reference = finished[0][1]["dense_reference"] if finished else None
    notes = _budget_notes(jobs) + [f"- failed: {f}" for f in failures]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.md", out / "comparison.csv", out / "pareto.png"]
    ckpt.atomic_write_text(paths[0], format_markdown(rows, reference, title, notes))
    ckpt.atomic_write_text(paths[1], format_csv(rows))
    plot_pareto(rows, paths[2], title)
    return paths


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _criterion_text(p: dict) -> str:
    """What chose the kept connections of a sized NeST run (its ``[pruning]`` section)."""
    if p.get("criterion", "magnitude") == "l0":
        flops = p.get("target_flops", 0)
        return "learned hard-concrete gates, the most open kept" + (f", FLOPs steered to {flops:,}" if flops else "")
    return f"|W*| ranking, scope {p['scope']}, rewire {p['rewire']}"


def _budget_notes(jobs: list[Job]) -> list[str]:
    """One line per method with the hyperparameters it ran with (its config section)."""
    lines, seen = ["Settings per method (epochs are the budget; the Epochs column counts what ran):", ""], set()
    for j in jobs:
        if j.method in seen:
            continue
        seen.add(j.method)
        d = config_mod.tomllib.loads(j.cfg_toml)
        if j.method == "nest" and d["pruning"]["target_weights"]:
            g, p = d["growth"], d["pruning"]
            text = (f"growth ≤ {g['max_epochs'] or g['max_iterations'] * g['epochs_per_iteration']} epochs "
                    f"({g['epochs_per_iteration']} per iteration) to target {g['target']}, then a cubic size schedule "
                    f"to the target over {p['schedule_share']:.0%} of the pruning iterations ({p['retrain_epochs']} "
                    f"epoch each; {_criterion_text(p)}, learning rate per {p['lr_schedule']}), "
                    f"final {p['final_epochs']} epochs; budget {p['budget_epochs'] or 'none'} epochs in all")
        elif j.method == "nest":
            g, p = d["growth"], d["pruning"]
            text = (f"growth ≤ {g['max_iterations']} × {g['epochs_per_iteration']} epochs to target {g['target']}, "
                    f"pruning rate {p['rate']} × ≤ {p['max_iterations']} iterations ({p['retrain_epochs']} epoch "
                    f"each, tolerance {p['tolerance']}), final {p['final_epochs']} epochs; "
                    f"dense reference {d['dense']['epochs']} epochs")
        else:
            text = ", ".join(f"{k}={v}" for k, v in d["methods"][j.method].items())
        lines.append(f"- **{j.method}**: {text}")
    return lines + [""]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def write_curves(finished: list[tuple[Job, dict]], jobs: list[Job], out: Path, title: str,
                 failures: list[str] = ()) -> list[Path]:
    """curves.csv (one row per run), curves.md (mean ± std per method and size) and
    curves.png (test error vs active weights and vs FLOPs, ±std bands) in ``out``."""
    from ..report.curves import curve_row, format_curves_csv, format_curves_markdown, plot_curves

    rows = [curve_row(r, j.size, _relative(j.run_dir, out)) for j, r in finished]
    notes = _budget_notes(jobs) + [f"- failed: {f}" for f in failures]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.csv", out / "curves.md", out / "curves.png"]
    ckpt.atomic_write_text(paths[0], format_curves_csv(rows))
    ckpt.atomic_write_text(paths[1], format_curves_markdown(rows, title, notes))
    plot_curves(rows, paths[2], title)
    return paths


def write_sweep(finished: list[tuple[Job, dict]], jobs: list[Job], key: str, out: Path, title: str,
                failures: list[str] = ()) -> list[Path]:
    """sweep.csv (one row per run) and sweep.png in ``out``."""
    from ..report.curves import format_sweep_csv, plot_sweep, sweep_row

    rows = [sweep_row(r, key, j.value, _relative(j.run_dir, out)) for j, r in finished]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.csv", out / "sweep.png"]
    ckpt.atomic_write_text(paths[0], format_sweep_csv(rows))
    plot_sweep(rows, key, paths[1], title)
    if failures:
        ckpt.atomic_write_text(out / "failures.txt", "\n".join(failures) + "\n")
    return paths

