"""Defaults that work without a config on small data (issue 11): every baseline on digits.

``nestsynth prune --method M --dataset digits --model mlp:64-64-32-10`` with no config must
end at <= 10% test error with fewer weights than the dense reference (6,464).  Before the
training budgets (train.min_steps_per_epoch), 11 of the 12 ended near chance.
"""

from __future__ import annotations

import pytest

from nestsynth import config as config_mod
from nestsynth.api import resolve_reference
from nestsynth.baselines.runner import run_method
from nestsynth.data import load_dataset

MODEL = "mlp:64-64-32-10"
DENSE_WEIGHTS = 64 * 64 + 64 * 32 + 32 * 10  # 6,464
MAX_TEST_ERROR = 0.10
# fixed-size defaults: per-layer round(n * (1 - sparsity)) (random 0.8, the others 0.9), snip/grasp one
# global ranking, RadiX-Net at density 0.2 (its quantized layer densities)
EXACT_WEIGHTS = {"random": 819 + 410 + 64, "oneshot": 410 + 205 + 32, "gradual": 410 + 205 + 32,
                 "lobs": 410 + 205 + 32, "snip": round(DENSE_WEIGHTS * 0.1), "grasp": round(DENSE_WEIGHTS * 0.1)}
SLOW = {"l0"}  # more than ~10 s on a busy 2-core machine
BASELINES = ["dense", "random", "han", "oneshot", "gradual", "lottery", "snip", "grasp", "l0", "sensitivity",
             "lobs", "n2ps", "radix"]


@pytest.fixture(scope="module")
def default_digits():
    """digits as the CLI loads it with no config (10% validation, split seed 0)."""
    cfg = config_mod.load(None, [])
    return load_dataset("digits", None, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
                                    for m in BASELINES])
def test_baseline_default_on_digits(default_digits, method):
    cfg = config_mod.load(None, [f'model="{MODEL}"', f'method="{method}"'])  # as `prune` with no --config
    model, report = run_method(cfg, default_digits, resolve_reference(cfg.model, default_digits), None)
    assert report["dense_reference"]["weights"] == DENSE_WEIGHTS
    assert report["test_error"] <= MAX_TEST_ERROR
    assert report["warnings"] == []
    if method == "dense":
        assert report["weights"]["final"] == DENSE_WEIGHTS
    else:
        assert report["weights"]["final"] < DENSE_WEIGHTS
    if method in EXACT_WEIGHTS:
        assert report["weights"]["final"] == EXACT_WEIGHTS[method]


@pytest.mark.slow
def test_nest_default_on_digits(default_digits):
    """`nestsynth synthesize --dataset digits --model mlp:64-64-32-10` with no config: <= 5% test error,
    smaller than dense (measured: 1.94% at 2,034 weights; before the training budgets, 33.6% at 200)."""
    cfg = config_mod.load(None, [f'model="{MODEL}"'])
    model, report = run_method(cfg, default_digits, resolve_reference(cfg.model, default_digits), None)
    assert report["test_error"] <= 0.05
    assert report["weights"]["final"] < DENSE_WEIGHTS
    assert report["pruning"]["stop_reason"] in ("bound", "floor", "iterations")
