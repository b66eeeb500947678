"""report.json and the final model file (the model file itself: :mod:`.run_files`)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import NestError
from ..metrics import reference_flops, reference_weights, totals
from ..sparse import SparseMLP
from .plots import redraw_plots
from .run_files import (HISTORY_KEYS, MODEL_FORMAT, load_model, load_run_model, read_history,  # noqa: F401
                        save_model)


def core_report(*, cfg, method: str, model_name: str, dataset: str, rows: list[dict],
                test_error: float | None, val_error: float | None, ref_widths, final_widths,
                device: str, input_shape=None, dense: dict | None = None, epochs: int | None = None,
                wall: float = 0.0, reference=None) -> dict:
    """The part of ``report.json`` every method shares (NeST and the baselines).

    ``reference`` (a registered spec or a dense model) gives the dense weights and
    FLOPs; by default they are those of the MLP with ``ref_widths``.
    ``compression.flops`` divides the dense reference's FLOPs by the final model's
    activation-aware FLOPs, as the paper's 79.4x for LeNet-300-100 (532K / 6.7K) does.
    """
    tot = totals(rows)
    ref = list(ref_widths) if reference is None else reference
    ref_weights, ref_flops = reference_weights(ref), reference_flops(ref)
    return {
        "method": method,
        "model": model_name,
        "dataset": dataset,
        "input_shape": list(input_shape) if input_shape else None,
        "seed": cfg.seed,
        "test_error": test_error,
        "val_error": val_error,
        "weights": {"seed": None, "post_growth": None, "final": tot["weights"]},
        "parameters_final": tot["parameters"],
        "flops": {"final": round(tot["flops"]), "final_act": round(tot["flops_act"])},
        "widths": {"reference": list(ref_widths), "seed": None, "post_growth": None,
                   "final": list(final_widths)},
        "dense_reference": {"widths": list(ref_widths), "weights": ref_weights, "flops": ref_flops,
                            **dict(dense or {})},
        "compression": {"weights": ref_weights / max(tot["weights"], 1),
                        "flops": ref_flops / max(tot["flops_act"], 1e-9)},
        "layers": [{k: r.get(k) for k in ("name", "in", "out", "weights", "parameters", "flops", "flops_act",
                                          "act_pct", "conv_pct", "kernel", "out_hw") if k in r} for r in rows],
        "budget": {"epochs": epochs},
        "warnings": [],  # the sanity checks' sentences (nestsynth.sanity), filled in by the runner
        "wall_seconds": round(wall, 2),
        "environment": {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                        "config_digest": cfg.digest()},
    }


def build_report(*, cfg, model_name: str, dataset: str, state, rows: list[dict],
                 test_error: float | None, val_error: float | None, ref_widths, final_widths,
                 device: str, input_shape=None, reference=None) -> dict:
    """The report of a finished NeST run (the layout of ``report.json``)."""
    report = core_report(cfg=cfg, method="nest", model_name=model_name, dataset=dataset, rows=rows,
                         test_error=test_error, val_error=val_error, ref_widths=ref_widths,
                         final_widths=final_widths, device=device, input_shape=input_shape,
                         dense=state.dense, epochs=getattr(state, "epochs", None), wall=state.elapsed,
                         reference=reference)
    growth_rows = [r for r in state.history if r["phase"] == "growth"]
    prune_rows = [r for r in state.history if r["phase"] == "pruning"]
    report["weights"].update(seed=state.weights.get("seed"), post_growth=state.weights.get("post_growth"))
    seed_rows = [r for r in state.history if r["phase"] == "seed"]
    per_layer = {"weights_seed": seed_rows[0].get("layer_weights") if seed_rows else None,
                 "weights_post_growth": state.post_growth_layers or None}
    for key, values in per_layer.items():  # the Seed / Post-Growth columns of the paper's Tables 5 and 6
        if values and len(values) == len(report["layers"]):
            for row, v in zip(report["layers"], values):
                row[key] = v
    report["widths"].update(seed=state.widths.get("seed"), post_growth=state.widths.get("post_growth"))
    report["growth"] = {"target_val_error": state.target, "reached": state.reached,
                        "iterations": len(growth_rows),
                        "epochs": len(growth_rows) * cfg.growth.epochs_per_iteration,
                        "seconds": round(sum(r.get("seconds", 0.0) for r in growth_rows), 3),
                        "grown_connections": sum(r.get("grown_connections", 0) for r in growth_rows),
                        "grown_neurons": [sum(x) for x in zip(*(r["grown_neurons"] for r in growth_rows
                                                                 if r.get("grown_neurons")))]}
    report["pruning"] = {"bound_val_error": state.bound, "iterations": len(prune_rows),
                         "accepted_iterations": sum(bool(r.get("accepted")) for r in prune_rows),
                         "stop_reason": getattr(state, "stop_reason", None),
                         "kept_iteration": getattr(state, "kept_iteration", None),
                         "target_weights": cfg.pruning.target_weights or None,
                         "bound_exceeded": any(r["val_error"] > state.bound for r in prune_rows if r.get("accepted"))
                         if state.bound is not None else False}
    return report


def write_run_outputs(run: Path, model: SparseMLP, report: dict) -> None:
    """report.json, model.pt and the plots of a finished run."""
    save_model(model, ckpt.model_path(run), report["model"], report.get("input_shape"))
    ckpt.atomic_write_text(ckpt.report_path(run), json.dumps(report, indent=2) + "\n")
    redraw_plots(run)


def read_report(run: Path) -> dict:
    """A finished run's report.json, checked to hold what the per-layer table prints.

    Raises:
        NestError: no report.json, not JSON, or a field missing or of the wrong type.
    """
    from .tables import format_layer_table

    path = ckpt.report_path(run)
    if not path.is_file():
        raise NestError(f"{str(run)!r} has no report.json: it is not a finished nestsynth run.")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NestError(f"{str(path)!r} is not valid JSON.") from None
    damaged = "the file is damaged: restore it from a copy or run again"
    if not isinstance(report, dict):
        raise NestError(f"{str(path)!r} holds a JSON {type(report).__name__}, not a report; {damaged}.")
    try:
        format_layer_table(report)
    except KeyError as exc:
        raise NestError(f"{str(path)!r} lacks the field {exc.args[0]!r}; {damaged}.") from None
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise NestError(f"{str(path)!r} holds a field of the wrong type ({exc}); {damaged}.") from None
    return report
