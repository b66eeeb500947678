"""nestsynth.report: grown-input density (paper Fig. 3) and the per-layer table."""

from __future__ import annotations

import torch

from nestsynth.report import format_layer_table
from nestsynth.report.plots import grown_input_density


def test_grown_input_density_hand_computed():
    seed = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    grown = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # row 2 is a new neuron
    # grown connections: (0,1), (1,2), (2,0), (2,2) -> per input 1, 1, 2 over 3 neurons
    torch.testing.assert_close(grown_input_density(seed, grown), torch.tensor([1 / 3, 1 / 3, 2 / 3]))


def test_format_layer_table_rows_and_totals():
    report = {
        "layers": [{"name": "fc1", "in": 64, "out": 30, "weights": 700, "act_pct": 50.0, "flops": 1400,
                    "flops_act": 1400},
                   {"name": "fc2", "in": 30, "out": 10, "weights": 100, "act_pct": 100.0, "flops": 200,
                    "flops_act": 100}],
        "weights": {"seed": 500, "post_growth": 900, "final": 800}, "flops": {"final": 1600, "final_act": 1500},
        "dense_reference": {"widths": [64, 300, 10], "weights": 22200, "flops": 44400},
        "compression": {"weights": 27.75, "flops": 29.6}, "model": "m", "dataset": "d", "seed": 0,
        "test_error": 0.05, "val_error": 0.04, "parameters_final": 840, "wall_seconds": 3.0,
    }
    text = format_layer_table(report)
    lines = text.splitlines()
    fc1 = next(line for line in lines if line.startswith("fc1")).split()
    assert fc1 == ["fc1", "64", "30", "700", "50%", "1.4K", "1.4K"]
    total = next(line for line in lines if line.startswith("Total")).split()
    assert total == ["Total", "800", "1.6K", "1.5K"]
    assert "27.8x weights" in text and "29.6x FLOPs" in text and "5.00%" in text
