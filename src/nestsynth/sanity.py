"""Sanity checks of a finished run: what a user should read before trusting its numbers.

Each check turns facts of the run into one sentence that says what went wrong and which
setting to change.  The sentences go into ``report["warnings"]`` (``report.json``) and
are logged at WARNING level on the ``nestsynth.sanity`` logger (Python prints them on
stderr when no logging handler is configured).

Checks:

* **near chance**: the dense reference or the final model has an error of at least
  :data:`NEAR_CHANCE` times the chance-level error (always guessing the most frequent
  class of that split);
* **growth short of its target**: NeST's growth stopped (``growth.max_iterations``)
  above its target validation error;
* **small validation split**: no validation split (decisions look at the training data),
  or fewer than :data:`MIN_VAL_EXAMPLES` examples;
* **stalled training loss**: the last training loss is still at least
  :data:`STALL_LOSS` x ln(classes) (a uniform guess) and the second half of the
  training calls did not bring the loss :data:`STALL_GAIN` below the first half's best.
"""

from __future__ import annotations

import logging
import math

import torch

LOGGER = logging.getLogger("nestsynth.sanity")

NEAR_CHANCE = 0.5  # an error >= this share of the chance-level error is "near chance"
MIN_VAL_EXAMPLES = 100  # below this, one example moves the validation error by more than 1%
STALL_LOSS = 0.5  # share of ln(classes) a stalled loss still has
STALL_GAIN = 0.01  # relative improvement of the second half's best loss that counts as progress


def chance_error(y: torch.Tensor | None) -> float | None:
    """Error of always guessing the most frequent label of ``y`` (None when ``y`` is empty).

    Example:
        >>> chance_error(torch.tensor([0, 0, 1, 2]))
        0.5
    """
    if y is None or len(y) == 0:
        return None
    return 1.0 - float(torch.bincount(y).max()) / len(y)


def near_chance(error: float | None, chance: float | None) -> bool:
    """True when ``error`` is at least :data:`NEAR_CHANCE` x ``chance`` (both known, chance > 0)."""
    return error is not None and bool(chance) and error >= NEAR_CHANCE * chance


def loss_stalled(losses: list[float], classes: int) -> bool:
    """True when training made no progress while the loss is still high.

    Args:
        losses: mean training losses in order (one per epoch or per training call).
        classes: number of classes (a uniform guess has loss ln(classes)).

    Returns:
        True when there are at least 4 losses, the last is at least
        ``STALL_LOSS * ln(classes)``, and the best of the second half is not
        ``STALL_GAIN`` (relative) below the best of the first half.
    """
    if len(losses) < 4 or classes < 2:
        return False
    half = len(losses) // 2
    still_high = losses[-1] >= STALL_LOSS * math.log(classes)
    return still_high and min(losses[half:]) > (1.0 - STALL_GAIN) * min(losses[:half])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def check_run(data, *, final_val: float | None, final_test: float | None, dense: dict | None,
              losses: list[float], growth: dict | None = None) -> list[str]:
    """The warnings of a finished run (an empty list when all is well).

    Args:
        data: the run's DataBundle (``val``/``test`` splits, ``num_classes``).
        final_val, final_test: the final model's validation and test error (None: unknown).
        dense: the dense reference's ``{"val_error", "test_error"}`` when the run trained one.
        losses: the training losses in order (see :func:`loss_stalled`).
        growth: NeST's growth outcome ``{"reached", "target", "val_error", "iterations"}``,
            or None (a baseline, or growth off).

    Returns:
        One sentence per failed check, in the order of the module docstring.
    """
    val_y = data.val.y if data.val is not None and len(data.val.y) else data.train.y
    test_y = data.test.y if data.test is not None and len(data.test.y) else None
    out = []
    if dense is not None:
        err, chance, split = _worst(dense.get("val_error"), val_y, dense.get("test_error"), test_y)
        if near_chance(err, chance):
            out.append(f"the dense reference ends at {_pct(err)} {split} error, near chance ({_pct(chance)} "
                       "by always guessing the most frequent class): its training budget is too short or its "
                       "learning rate unsuitable; raise the dense epochs or train.min_steps_per_epoch, or "
                       "change train.lr.")
    err, chance, split = _worst(final_val, val_y, final_test, test_y)
    if near_chance(err, chance):
        out.append(f"the final model ends at {_pct(err)} {split} error, near chance ({_pct(chance)} by always "
                   "guessing the most frequent class): it is not a usable network; give it more training "
                   "(epochs, train.min_steps_per_epoch) or prune less.")
    if growth is not None and not growth["reached"] and growth.get("target") is not None:
        out.append(f"growth stopped after {growth['iterations']} iterations at {_pct(growth['val_error'])} "
                   f"validation error without reaching its target {_pct(growth['target'])}; pruning started "
                   "from there. Raise growth.max_iterations or growth.epochs_per_iteration.")
    out += _validation_warnings(data)
    if loss_stalled(losses, data.num_classes):
        out.append(f"the training loss stalls at {losses[-1]:.3f} (a uniform guess over {data.num_classes} "
                   f"classes gives {math.log(data.num_classes):.3f}): it fell by less than "
                   f"{_pct(STALL_GAIN)} over the second half of training. The network is not learning: it "
                   "may be too sparse to train (prune less), get too few optimizer steps (epochs, "
                   "train.min_steps_per_epoch) or an unsuitable train.lr; check that inputs are scaled and "
                   "labels right.")
    return out


def _worst(val: float | None, val_y, test: float | None, test_y) -> tuple[float | None, float | None, str]:
    """(error, chance, split name) of the split whose error is nearer its chance level."""
    cands = [(e, chance_error(y), name) for e, y, name in ((val, val_y, "validation"), (test, test_y, "test"))
             if e is not None and y is not None]
    cands = [c for c in cands if c[1]]
    return max(cands, key=lambda c: c[0] / c[1]) if cands else (None, None, "")


def _validation_warnings(data) -> list[str]:
    if data.val is None or len(data.val.y) == 0:
        return ["there is no validation split (data.val_fraction = 0 and no validation data): every decision "
                "(growth target, pruning bound, kept model) looks at the training data and cannot see "
                "overfitting; set data.val_fraction to 0.1 or pass validation data."]
    n = len(data.val.y)
    if n < MIN_VAL_EXAMPLES:
        return [f"the validation split has only {n} examples: one example moves the validation error by "
                f"{_pct(1 / n)}, so decisions rest on a handful of examples; raise data.val_fraction or pass "
                f"at least {MIN_VAL_EXAMPLES} validation examples."]
    return []


def synthesis_warnings(state, data, report: dict) -> list[str]:
    """:func:`check_run` for a finished NeST run (``state`` is its LoopState), logged."""
    growth_rows = [r for r in state.history if r["phase"] == "growth"]
    # under a size target the growth target is a stopping hint, not a promise: pruning goes to the size anyway
    sized = bool(report.get("pruning", {}).get("target_weights"))
    growth = ({"reached": state.reached, "target": state.target, "val_error": growth_rows[-1]["val_error"],
               "iterations": len(growth_rows)} if growth_rows and not sized else None)
    losses = [r["train_loss"] for r in state.history if r.get("train_loss") is not None]
    return emit(check_run(data, final_val=report.get("val_error"), final_test=report.get("test_error"),
                          dense=state.dense, losses=losses, growth=growth))


def emit(messages: list[str]) -> list[str]:
    """Log every message at WARNING on ``nestsynth.sanity``; returns ``messages``."""
    for message in messages:
        LOGGER.warning("warning: %s", message)
    return messages
