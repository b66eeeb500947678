"""Latency measurement: warm-up, then repeated timed samples; median and spread."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def measure_latency(fn: Callable[[], object], *, warmup: int = 10, repeats: int = 30,
                    min_sample_s: float = 2e-3, min_warmup_s: float = 0.05) -> dict:
    """Latency of one call of ``fn`` (seconds are reported in milliseconds).

    Warm-up runs ``fn`` at least ``warmup`` times and ``min_warmup_s`` seconds.  Each
    of the ``repeats`` samples then times ``inner`` back-to-back calls, ``inner`` chosen
    so a sample lasts at least ``min_sample_s`` (timer resolution), and divides.

    Returns:
        ``median_ms``, ``p25_ms``, ``p75_ms``, ``iqr_ms``, ``min_ms``, ``max_ms``,
        ``mean_ms``, ``repeats``, ``inner``.
    """
    with torch.inference_mode():
        start = time.perf_counter()
        n = 0
        while n < warmup or time.perf_counter() - start < min_warmup_s:
            fn()
            n += 1
        per_call = (time.perf_counter() - start) / n
        inner = max(1, int(min_sample_s / max(per_call, 1e-9)) + 1) if per_call < min_sample_s else 1
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner * 1e3)
    xs = sorted(samples)
    p25, p75 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    return {"median_ms": statistics.median(xs), "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25,
            "min_ms": xs[0], "max_ms": xs[-1], "mean_ms": statistics.fmean(xs), "repeats": repeats,
            "inner": inner}
