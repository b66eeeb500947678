"""Sanity checks: each warning fires on its condition only, and lands in report.json."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from nestsynth.data.base import DataBundle, Dataset
from nestsynth.sanity import (MIN_VAL_EXAMPLES, chance_error, check_run, loss_stalled, near_chance)

GOOD_LOSSES = [2.0, 1.0, 0.5, 0.3, 0.2, 0.15]


def bundle(n_val: int | None = 200, classes: int = 4) -> DataBundle:
    """Labels cycle over ``classes`` (chance error 1 - 1/classes); inputs are irrelevant here."""
    def part(n):
        return Dataset(torch.zeros(n, 3), torch.arange(n) % classes)
    return DataBundle("toy", part(400), part(n_val) if n_val is not None else None, part(100), (3,), classes)


def test_chance_error_is_the_majority_guess():
    assert chance_error(torch.tensor([0, 0, 1, 2])) == 0.5
    assert chance_error(torch.arange(10) % 5) == pytest.approx(0.8)
    assert chance_error(torch.tensor([], dtype=torch.long)) is None


@pytest.mark.parametrize("error, chance, expected", [
    (0.45, 0.9, True), (0.449, 0.9, False), (0.02, 0.9, False), (None, 0.9, False), (0.5, 0.0, False)])
def test_near_chance_threshold(error, chance, expected):
    assert near_chance(error, chance) is expected


def test_loss_stalled():
    ln10 = math.log(10)
    assert loss_stalled([2.30, 2.29, 2.30, 2.29], 10)           # flat at a uniform guess
    assert not loss_stalled([2.30, 2.0, 1.6, 1.2], 10)          # high but still falling
    assert not loss_stalled([0.30, 0.30, 0.30, 0.30], 10)       # flat but fitted
    assert not loss_stalled([2.3, 2.3, 2.3], 10)                # too few to judge
    # the second half's best must be 1% below the first half's: 0.995 x is not progress
    first = 0.6 * ln10
    assert loss_stalled([first, first, 0.995 * first, 0.995 * first], 10)
    assert not loss_stalled([first, first, 0.98 * first, 0.98 * first], 10)


def test_a_healthy_run_has_no_warnings():
    assert check_run(bundle(), final_val=0.05, final_test=0.06, dense={"val_error": 0.03, "test_error": 0.04},
                     losses=GOOD_LOSSES, growth={"reached": True, "target": 0.03, "val_error": 0.03,
                                                 "iterations": 3}) == []


def test_each_condition_gives_its_own_warning():
    data = bundle()  # chance error 0.75 on every split
    dense = check_run(data, final_val=0.05, final_test=0.06, dense={"val_error": 0.5, "test_error": 0.1},
                      losses=GOOD_LOSSES)
    assert len(dense) == 1 and dense[0].startswith("the dense reference ends at 50.0% validation error, "
                                                   "near chance (75.0%")
    final = check_run(data, final_val=0.1, final_test=0.4, dense=None, losses=GOOD_LOSSES)
    assert len(final) == 1 and final[0].startswith("the final model ends at 40.0% test error, near chance")
    growth = check_run(data, final_val=0.05, final_test=0.06, dense=None, losses=GOOD_LOSSES,
                       growth={"reached": False, "target": 0.02, "val_error": 0.361, "iterations": 10})
    assert growth == [growth[0]] and growth[0].startswith(
        "growth stopped after 10 iterations at 36.1% validation error without reaching its target 2.0%")
    stall = check_run(data, final_val=0.05, final_test=0.06, dense=None, losses=[1.2, 1.1, 1.2, 1.1])
    assert len(stall) == 1 and stall[0].startswith("the training loss stalls at 1.100 (a uniform guess over "
                                                   "4 classes gives 1.386)")


@pytest.mark.parametrize("n_val, expected", [
    (None, "there is no validation split"), (12, "the validation split has only 12 examples: one example "
                                                "moves the validation error by 8.3%"),
    (MIN_VAL_EXAMPLES, None)])
def test_validation_split_size(n_val, expected):
    got = check_run(bundle(n_val), final_val=0.05, final_test=0.06, dense=None, losses=GOOD_LOSSES)
    assert got == [] if expected is None else (len(got) == 1 and got[0].startswith(expected))


def _digits_small_val(digits, n_val: int) -> DataBundle:
    """digits with only ``n_val`` validation examples (the rest of the validation split dropped)."""
    val = Dataset(digits.val.X[:n_val], digits.val.y[:n_val])
    return DataBundle(digits.name, digits.train, val, digits.test, digits.input_shape, digits.num_classes)


def test_baseline_report_json_holds_the_warnings(digits, tmp_path, caplog):
    """Four optimizer steps at lr 1e-5 leave the model at chance with a flat loss; 20 validation
    examples are too few.  report.json says all three, and the log too."""
    from nestsynth.api import resolve_reference
    from nestsynth.baselines.runner import run_method
    from nestsynth.config import from_dict

    data = _digits_small_val(digits, 20)
    cfg = from_dict({"method": "random", "model": "mlp:64-16-10",
                     "train": {"lr": 1e-5, "min_steps_per_epoch": 0, "batch_size": 2048},
                     "methods": {"random": {"sparsity": 0.5, "epochs": 4}}})
    with caplog.at_level(logging.WARNING, logger="nestsynth.sanity"):
        _, report = run_method(cfg, data, resolve_reference(cfg.model, data), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    final, val, stall = saved["warnings"]
    errors = {f"{100 * report['val_error']:.1f}% validation", f"{100 * report['test_error']:.1f}% test"}
    assert final.startswith("the final model ends at ") and final.split(" error,")[0][24:] in errors
    assert val.startswith("the validation split has only 20 examples: one example moves the validation "
                          "error by 5.0%")
    assert stall.startswith("the training loss stalls at 2.")
    assert [r.getMessage() for r in caplog.records] == [f"warning: {w}" for w in saved["warnings"]]
    assert report["warnings"] == saved["warnings"]


def test_nest_report_says_growth_fell_short(digits, tmp_path):
    from nestsynth.api import resolve_reference
    from nestsynth.baselines.runner import run_method
    from nestsynth.config import from_dict

    cfg = from_dict({"model": "mlp:64-16-10", "device": "cpu", "train": {"min_steps_per_epoch": 0},
                     "growth": {"target": "0.0", "max_iterations": 1, "epochs_per_iteration": 1},
                     "pruning": {"max_iterations": 1}})
    _, report = run_method(cfg, digits, resolve_reference(cfg.model, digits), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    growth = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["phase"] == "growth"]
    assert not report["growth"]["reached"] and len(growth) == 1
    assert (f"growth stopped after 1 iterations at {100 * growth[0]['val_error']:.1f}% validation error "
            "without reaching its target 0.0%; pruning started from there.") in " ".join(saved["warnings"])
