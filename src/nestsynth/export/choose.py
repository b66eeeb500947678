"""Dense or CSR storage for one layer: a timing of both at the requested batch size.

``auto`` stores a layer as CSR only when the measured CSR forward is faster than the
dense one by more than ``margin`` *and* the layer's density is below
``max_csr_density`` (at higher densities a sparse kernel cannot win on a CPU; the cap
keeps a noisy measurement from choosing CSR for a dense layer).  The decision and the
two timings are recorded in the layer's description.
"""

from __future__ import annotations

import torch

from .bench import measure_latency
from .compact_base import CompactLinear

MAX_CSR_DENSITY = 0.5
MARGIN = 0.05


def time_layer(weight: torch.Tensor, bias: torch.Tensor, batch_size: int, *, repeats: int = 15,
               seed: int = 0) -> dict:
    """Median forward latency (ms) of the layer stored dense and as CSR, on random input.

    Both are timed through :class:`CompactLinear`, the code that runs at inference.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, weight.shape[1], generator=g)
    out = {}
    for storage in ("dense", "csr"):
        layer = CompactLinear(weight, bias, storage)
        lat = measure_latency(lambda: layer(x), warmup=3, repeats=repeats, min_sample_s=1e-3, min_warmup_s=0.01)
        out[f"{storage}_ms"] = lat["median_ms"]
    return out


def choose_storage(weight: torch.Tensor, bias: torch.Tensor, batch_size: int = 1, *, mode: str = "auto",
                   max_csr_density: float = MAX_CSR_DENSITY, margin: float = MARGIN, repeats: int = 15,
                   measure: bool = True) -> dict:
    """Storage of one (out, in) layer: ``{"storage", "reason", "density", "batch_size", timings}``.

    Args:
        mode: ``auto``, or ``dense`` / ``csr`` to force (no timing).
        measure: in ``auto`` mode, False skips the timing (the layer is stored dense).
    """
    numel = weight.numel()
    density = float(torch.count_nonzero(weight)) / numel if numel else 1.0
    out = {"density": round(density, 6), "batch_size": int(batch_size)}
    if mode in ("dense", "csr"):
        return {"storage": mode, "reason": f"forced by --sparse {mode}", **out}
    if numel == 0 or not measure:
        return {"storage": "dense", "reason": "empty layer" if numel == 0 else "not measured", **out}
    t = time_layer(weight, bias, batch_size, repeats=repeats)
    out.update({k: round(v, 6) for k, v in t.items()})
    faster = t["csr_ms"] < (1.0 - margin) * t["dense_ms"]
    if density >= max_csr_density:
        storage, reason = "dense", f"density {density:.2f} >= {max_csr_density}: CSR is not considered"
    elif faster:
        storage, reason = "csr", (f"CSR {t['csr_ms']:.4f} ms < dense {t['dense_ms']:.4f} ms "
                                  f"at batch {batch_size}")
    else:
        storage, reason = "dense", (f"dense {t['dense_ms']:.4f} ms <= CSR {t['csr_ms']:.4f} ms "
                                    f"(with a {margin:.0%} margin) at batch {batch_size}")
    return {"storage": storage, "reason": reason, **out}
