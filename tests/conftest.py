"""Shared fixtures for the nestsynth unit tests.

One intra-op thread: the models here are tiny, and a second thread only adds
scheduling overhead (and huge slow-downs when the machine is busy).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """The digits bundle (no download), 20% validation."""
    from nestsynth.data import load_dataset

    return load_dataset("digits", val_fraction=0.2, split_seed=0)
