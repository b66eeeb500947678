"""``nestsynth compare``: every method x every seed in one harness, then one table.

Run directories are ``OUT/METHOD/seedN``.  A directory that already holds a finished
run of the same config (same digest) is reused, an unfinished one is continued
(NeST from its checkpoint, a baseline from its start), so an interrupted comparison
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .. import checkpoint as ckpt
from .. import config as config_mod
from ..config import Config
from ..errors import NestError
from .registry import method_names
from .runner import is_finished


@dataclasses.dataclass
class Job:
    method: str
    seed: int
    run_dir: Path
    cfg_toml: str


def plan(base: Config, methods: list[str], seeds: list[int], out: Path) -> list[Job]:
    """One job per (method, seed); configs are validated before anything runs.

    Raises:
        NestError: unknown method, empty lists, or a run directory holding another config.
    """
    known = method_names()
    bad = [m for m in methods if m not in known]
    if bad:
        raise NestError(f"unknown method {bad[0]!r}; known methods: {', '.join(known)}.")
    if not methods or not seeds:
        raise NestError("compare needs at least one method and one seed.")
    from ..registry import get_model, is_cnn
    from .context import check_supported
    from .registry import get_method
    if is_cnn(get_model(base.model)):  # refuse MLP-only methods before anything runs
        for m in methods:
            if m != "nest":
                check_supported(get_method(m), True)
    jobs = []
    for m in methods:
        for s in seeds:
            cfg = config_mod.from_dict({"method": m, "seed": s}, base)
            run_dir = out / m / f"seed{s}"
            existing = ckpt.config_path(run_dir)
            if existing.is_file() and config_mod.load(existing).digest() != cfg.digest():
                raise NestError(f"{str(run_dir)!r} holds a run of another config; choose another --out "
                                "or remove that directory.")
            jobs.append(Job(m, s, run_dir, cfg.to_toml()))
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
    if is_finished(job.run_dir, cfg):
        return {"reused": True, **json.loads(ckpt.report_path(job.run_dir).read_text())}
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir or None, val_fraction=cfg.data.val_fraction,
                        split_seed=cfg.data.split_seed)
    reference = resolve_reference(cfg.model, data)
    resume = ckpt.config_path(job.run_dir).is_file()
    if resume and cfg.method == "nest" and not ckpt.checkpoint_path(job.run_dir).is_file():
        resume = False
        ckpt.config_path(job.run_dir).unlink()
    _, report = run_method(cfg, data, reference, job.run_dir, resume=resume)
    return {"reused": False, **report}


def run_all(jobs: list[Job], data_dir: str | None = None, workers: int = 1, threads: int = 0,
            tell=print) -> tuple[list[dict], list[str]]:
    """Run the jobs (``workers`` processes at a time); returns (reports, failures)."""
    reports, failures = {}, []

    def done(job, result=None, error=None):
        if error is not None:
            failures.append(f"{job.method} seed {job.seed}: {error}")
            tell(f"[{job.method} seed {job.seed}] failed: {error}")
            return
        reports[(job.method, job.seed)] = result
        err = result.get("test_error")
        tell(f"[{job.method} seed {job.seed}] {'reused' if result['reused'] else 'done'}: "
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
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job, data_dir, threads or 1): job for job in jobs}
            for fut in as_completed(futures):
                try:
                    done(futures[fut], fut.result())
                except NestError as exc:
                    done(futures[fut], error=str(exc))
    ordered = [reports[(j.method, j.seed)] for j in jobs if (j.method, j.seed) in reports]
    return ordered, failures


def write_comparison(reports: list[dict], jobs: list[Job], out: Path, title: str,
                     failures: list[str] = ()) -> list[Path]:
    """comparison.md, comparison.csv and pareto.png in ``out``."""
    from ..report.comparison import format_csv, format_markdown, plot_pareto, run_row

    run_dirs = {(j.method, j.seed): _relative(j.run_dir, out) for j in jobs}
    rows = [run_row(r, run_dirs.get((r.get("method", "nest"), r.get("seed")), "")) for r in reports]
    reference = reports[0]["dense_reference"] if reports else None
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


def _budget_notes(jobs: list[Job]) -> list[str]:
    """One line per method with the hyperparameters it ran with (its config section)."""
    lines, seen = ["Settings per method (epochs are the budget; the Epochs column counts what ran):", ""], set()
    for j in jobs:
        if j.method in seen:
            continue
        seen.add(j.method)
        d = config_mod.tomllib.loads(j.cfg_toml)
        if j.method == "nest":
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
