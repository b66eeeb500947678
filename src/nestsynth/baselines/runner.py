"""Run any registered method (NeST or a baseline) into a run directory with the same report.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import Config
from ..data import DataBundle
from ..distributed import current
from ..registry import CNNSpec, GraphSpec, ModelSpec
from ..run_context import RunContext
from ..sanity import check_run, emit
from ..sparse import SparseCNN, SparseMLP
from .context import check_supported
from .registry import get_method


def run_method(cfg: Config, data: DataBundle, reference: ModelSpec | CNNSpec | GraphSpec | SparseMLP,
               out: Path | None, *, resume: bool = False, progress: bool = False,
               on_iteration=None) -> tuple[SparseMLP | SparseCNN, dict]:
    """Run ``cfg.method`` on ``data`` for the reference architecture.

    ``reference`` is an MLP spec, a user's dense SparseMLP, or a ``CNNSpec`` or
    ``GraphSpec`` fitted to the data (see :func:`nestsynth.api.resolve_reference`); for a
    CNN or graph network a baseline's ``ctx.dense_model()`` is ``spec.build(ctx.generator)``
    and the report's dense reference is the spec's weights and FLOPs.

    Every method runs in one :class:`~nestsynth.run_context.RunContext`, which writes
    ``out``'s config.toml first and its metrics, report, model and plots last.  A
    checkpointed method (NeST: one checkpoint per iteration) continues from its last
    checkpoint with ``resume``; a baseline runs start to finish (minutes), so ``resume``
    on an unfinished baseline run starts it again from the beginning in the same
    directory, since only its finished state is stored.

    Args:
        on_iteration: called after every logged row of a baseline (with the context) and
            after every checkpoint of NeST (with its LoopState).

    Returns:
        (final model, report) -- the report has the layout of NeST's report.json.

    Raises:
        NestError: unknown method, a directory that holds another run, bad config values,
            a reference the method does not support (a CNN for an MLP-only method, a graph
            network for a chain-only one; raised before ``out`` is created), or a NeST
            checkpoint of another config.
    """
    method = get_method(cfg.method)
    check_supported(method, reference)
    current().mask_checks = current().mask_mismatches = 0  # counted per run (compare runs several)
    ctx = RunContext(cfg, data, reference, out, progress=progress, on_iteration=on_iteration, resume=resume)
    ctx.open_directory(method.checkpointed)
    t0 = time.monotonic()
    model = method.run(ctx, method.settings(cfg))
    model.zero_dormant()
    report = (method.report or method_report)(ctx, model, time.monotonic() - t0)
    dist = current()
    if dist.active:  # a single process's report.json stays as it was
        t = cfg.train
        report["distributed"] = {**dist.summary(), "total_batch": t.batch_size,
                                 "batch_per_rank": t.batch_size / dist.world_size, "lr": t.lr}
    ctx.write_outputs(model, report)
    return model, report


def method_report(ctx: RunContext, model: SparseMLP | SparseCNN, wall: float) -> dict:
    """report.json of a finished baseline run (see :func:`nestsynth.report.summary.core_report`).

    ``report["warnings"]`` holds the sanity checks' sentences (:mod:`nestsynth.sanity`),
    also logged on the ``nestsynth.sanity`` logger.

    The dense reference (weights, FLOPs) is ``ctx.spec``'s for a CNN or graph network, the
    MLP of ``ctx.widths`` otherwise.
    """
    from ..report.summary import core_report

    rows, test_error = ctx.measure(model)
    report = core_report(cfg=ctx.cfg, method=ctx.cfg.method, model_name=ctx.model_name, dataset=ctx.data.name,
                         rows=rows, test_error=test_error, val_error=ctx.val_error(model),
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
