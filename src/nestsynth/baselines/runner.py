"""Run any method (NeST or a baseline) into a run directory with the same report.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import Config
from ..data import DataBundle
from ..errors import NestError
from ..metrics import activation_density, layer_table
from ..registry import CNNSpec, GraphSpec, ModelSpec
from ..sanity import check_run, emit
from ..sparse import SparseCNN, SparseMLP
from ..training import evaluate
from .context import MethodContext, check_supported
from .registry import NEST, get_method


def prune(model="lenet-300-100", train=None, val=None, test=None, method: str = "gradual", config=None,
          out: str | Path | None = None, progress: bool = False):
    """Run a registered method (a baseline, or ``"nest"``) through the Python API.

    Args:
        model: a registered name (``"resnet20"``, ``"lenet-300-100"``), an ``mlp:`` spec,
            or any ``torch.nn.Module`` (see :func:`nestsynth.api.resolve_reference`: a
            plain ``nn.Sequential`` chain stays an MLP / CNN reference, any other network
            is a graph reference, built as a :class:`~nestsynth.graph.SparseGraph`).
        train, val, test, config, out, progress: as :func:`nestsynth.synthesize`.
        method: the method's name (``nestsynth methods`` lists them); it overrides the
            config's ``method``.

    Returns:
        (model, report): the final masked model (SparseMLP, SparseCNN or SparseGraph) and
        the report (the layout of report.json).

    Raises:
        NestError: unknown method or model, an unsupported network, or a method that
            cannot run on it (one sentence, before any work).

    Example:
        >>> net, report = nestsynth.baselines.prune(MyResNet(), (X, y), method="gradual",
        ...     config={"methods": {"gradual": {"epochs": 2, "end_epoch": 1}}})
    """
    from ..api import prepare

    cfg, data, reference = prepare(model, train, val, test, config, {"method": method})
    return run_method(cfg, data, reference, Path(out) if out is not None else None, progress=progress)


def run_method(cfg: Config, data: DataBundle, reference: ModelSpec | CNNSpec | GraphSpec | SparseMLP,
               out: Path | None, *, resume: bool = False, progress: bool = False,
               on_iteration=None) -> tuple[SparseMLP | SparseCNN, dict]:
    """Run ``cfg.method`` on ``data`` for the reference architecture.

    ``reference`` is an MLP spec, a user's dense SparseMLP, or a ``CNNSpec`` or
    ``GraphSpec`` fitted to the data (see :func:`nestsynth.api.resolve_reference`); for a
    CNN or graph network the baseline's ``ctx.dense_model()`` is
    ``spec.build(ctx.generator)`` and the report's dense reference is the spec's weights
    and FLOPs.

    NeST runs through :mod:`nestsynth.synthesis` (checkpointed per iteration).  A
    baseline runs start to finish (minutes); ``resume`` on an unfinished baseline run
    starts it again from the beginning in the same directory, since only its
    finished state is stored.

    Returns:
        (final model, report) -- the report has the layout of NeST's report.json.

    Raises:
        NestError: unknown method, a directory that holds another run, bad config values,
            a reference the method does not support (a CNN for an MLP-only method, a graph
            network for a chain-only one or for NeST; raised before ``out`` is created).
    """
    if cfg.method == NEST:
        from ..api import run_synthesis
        return run_synthesis(cfg, data, reference, out, resume=resume, progress=progress,
                             on_iteration=on_iteration)
    method = get_method(cfg.method)
    spec = reference if isinstance(reference, (CNNSpec, GraphSpec)) else None
    check_supported(method, reference)
    if out is not None:
        _prepare(out, cfg, resume)
    widths, acts, bn, model_name = _reference_shape(reference)
    device = _device(cfg.device)
    ctx = MethodContext(cfg, data, widths, acts, bn, device, progress, on_log=on_iteration, spec=spec)
    t0 = time.monotonic()
    model = method.run(ctx, getattr(cfg.methods, cfg.method))
    model.zero_dormant()
    report = method_report(ctx, model, model_name, time.monotonic() - t0)
    if out is not None:
        from ..report import write_run_outputs
        ckpt.write_jsonl(ckpt.metrics_path(out), ctx.history)
        write_run_outputs(out, model, report)
    return model, report


def method_report(ctx: MethodContext, model: SparseMLP | SparseCNN, model_name: str, wall: float) -> dict:
    """report.json of a finished baseline run (see :func:`nestsynth.report.summary.core_report`).

    ``report["warnings"]`` holds the sanity checks' sentences (:mod:`nestsynth.sanity`),
    also logged on the ``nestsynth.sanity`` logger.

    The dense reference (weights, FLOPs) is ``ctx.spec``'s for a CNN or graph network, the
    MLP of ``ctx.widths`` otherwise.
    """
    from ..report.summary import core_report

    test = ctx.data.test
    Xr = test.X.to(ctx.device) if test else ctx.Xv
    act = activation_density(model, Xr, ctx.cfg.train.eval_batch_size)
    test_error = evaluate(model, test.X.to(ctx.device), test.y.to(ctx.device))[0] if test else None
    report = core_report(cfg=ctx.cfg, method=ctx.cfg.method, model_name=model_name, dataset=ctx.data.name,
                         rows=layer_table(model, act), test_error=test_error, val_error=ctx.val_error(model),
                         ref_widths=ctx.widths, final_widths=model.widths, device=str(ctx.device),
                         input_shape=ctx.data.input_shape, dense=ctx.dense, epochs=ctx.epochs, wall=wall,
                         reference=ctx.spec)
    report["method_config"] = json.loads(json.dumps(ctx.cfg.to_dict()["methods"][ctx.cfg.method]))
    report["warnings"] = emit(check_run(ctx.data, final_val=report["val_error"], final_test=test_error,
                                        dense=ctx.dense, losses=ctx.losses))
    return report


def is_finished(out: Path, cfg: Config) -> bool:
    """True when ``out`` holds a finished run of exactly this config (same digest)."""
    path = ckpt.report_path(out)
    if not path.is_file():
        return False
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return report.get("environment", {}).get("config_digest") == cfg.digest()


def _prepare(out: Path, cfg: Config, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NestError(f"--out {str(out)!r} is a file, not a directory.")
    existing = ckpt.config_path(out)
    if existing.exists():
        from ..config import load
        if not resume:
            raise NestError(f"{str(out)!r} already holds a run; continue it with --resume or choose another --out.")
        if load(existing).digest() != cfg.digest():
            raise NestError(f"{str(out)!r} holds a run of another config; start a new run instead.")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(existing, cfg.to_toml())


def _device(name: str) -> torch.device:
    from ..synthesis import resolve_device
    return resolve_device(name)


def _reference_shape(reference):
    """(widths, activations, batch norm, model name) of the reference."""
    if isinstance(reference, GraphSpec):  # units per layer; its activations are in the network itself
        return list(reference.widths), None, False, reference.name
    from ..synthesis import _reference_shape as shape
    return shape(reference)
