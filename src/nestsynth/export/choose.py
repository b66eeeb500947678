"""Storage of one layer -- dense, CSR or generated C -- by a timing at the requested batch size.

``auto`` times the layer stored dense, as CSR and as a generated C kernel
(:mod:`.ckernel`, the layer alone, its input transposition included) and keeps the
fastest, provided a sparse storage beats dense by more than ``margin``.  The sparse
storages are considered only below ``max_csr_density`` (at higher densities a sparse
kernel does the dense work less efficiently; the cap keeps a noisy measurement, or a
tiny layer's call overhead, from choosing a sparse kernel for a dense layer).
When the C kernel cannot be built (no compiler, a failed compilation, an activation
without a C form) the layer is decided between dense and CSR as before and the reason
is recorded.  Conv stages are decided between ``nn.Conv2d`` and the C kernel.  The
decision and the timings are recorded in the layer's description; a run of
consecutive C layers runs as one function at inference, faster than the per-layer
timings say.
"""

from __future__ import annotations

import torch

from .bench import measure_latency
from .ckernel import CKernel, KernelUnavailable
from .compact_base import STORAGES, CompactLinear

MAX_CSR_DENSITY = 0.5
MARGIN = 0.05


def _time(fn, repeats: int) -> float:
    return measure_latency(fn, warmup=3, repeats=repeats, min_sample_s=1e-3, min_warmup_s=0.01)["median_ms"]


def _time_kernel(layer, in_shape, x: torch.Tensor, repeats: int, out: dict) -> None:
    """Add ``ckernel_ms`` to ``out``, or ``ckernel_unavailable`` (one line) when it cannot be built."""
    try:
        kernel = CKernel([layer], in_shape)
    except KernelUnavailable as exc:
        out["ckernel_unavailable"] = str(exc)
        return
    out["ckernel_ms"] = _time(lambda: kernel(x), repeats)


def time_layer(weight: torch.Tensor, bias: torch.Tensor, batch_size: int, *, repeats: int = 15,
               seed: int = 0, activation: str | None = None) -> dict:
    """Median forward latency (ms) of the layer stored dense, as CSR and as a C kernel, on random input.

    Dense and CSR are timed through :class:`CompactLinear`, the code that runs at
    inference.  Returns ``dense_ms``, ``csr_ms`` and ``ckernel_ms`` or ``ckernel_unavailable``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, weight.shape[1], generator=g)
    out = {}
    for storage in ("dense", "csr"):
        layer = CompactLinear(weight, bias, storage, activation)
        out[f"{storage}_ms"] = _time(lambda: layer(x), repeats)
    _time_kernel(CompactLinear(weight, bias, "ckernel", activation), (weight.shape[1],), x, repeats, out)
    return out


def _decide(t: dict, candidates: list[str], margin: float, batch_size: int) -> tuple[str, str]:
    """(storage, reason): the fastest candidate; a sparse one only when it beats dense by ``margin``."""
    best = min(candidates, key=lambda s: t[f"{s}_ms"])
    timings = ", ".join(f"{s} {t[f'{s}_ms']:.4f} ms" for s in sorted(candidates, key=lambda s: t[f"{s}_ms"]))
    if best != "dense" and t[f"{best}_ms"] < (1.0 - margin) * t["dense_ms"]:
        return best, f"fastest at batch {batch_size}: {timings}"
    return "dense", f"dense kept (sparse storage must be {margin:.0%} faster) at batch {batch_size}: {timings}"


def choose_storage(weight: torch.Tensor, bias: torch.Tensor, batch_size: int = 1, *, mode: str = "auto",
                   max_csr_density: float = MAX_CSR_DENSITY, margin: float = MARGIN, repeats: int = 15,
                   measure: bool = True, activation: str | None = None) -> dict:
    """Storage of one (out, in) layer: ``{"storage", "reason", "density", "batch_size", timings}``.

    Args:
        mode: ``auto``, or ``dense`` / ``csr`` / ``ckernel`` to force (no timing).
        measure: in ``auto`` mode, False skips the timing (the layer is stored dense).
        activation: the layer's activation (the C kernel applies it in the same pass).
    """
    numel = weight.numel()
    density = float(torch.count_nonzero(weight)) / numel if numel else 1.0
    out = {"density": round(density, 6), "batch_size": int(batch_size)}
    if mode in STORAGES:
        return {"storage": mode, "reason": f"forced by --sparse {mode}", **out}
    if numel == 0 or not measure:
        return {"storage": "dense", "reason": "empty layer" if numel == 0 else "not measured", **out}
    t = time_layer(weight, bias, batch_size, repeats=repeats, activation=activation)
    out.update({k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()})
    sparse = density < max_csr_density
    candidates = ["dense"] + (["csr"] if sparse else []) + (["ckernel"] if sparse and "ckernel_ms" in t else [])
    storage, reason = _decide(t, candidates, margin, batch_size)
    if not sparse:
        reason += f"; sparse storage not considered (density {density:.2f} >= {max_csr_density})"
    if "ckernel_unavailable" in t:
        reason += f"; no C kernel: {t['ckernel_unavailable']}"
    return {"storage": storage, "reason": reason, **out}


def choose_conv_storage(stage, in_shape, batch_size: int = 1, *, mode: str = "auto", margin: float = MARGIN,
                        repeats: int = 15) -> dict:
    """Storage of one :class:`~nestsynth.export.compact_cnn.CompactConv2d`: ``nn.Conv2d`` or the C kernel.

    Args:
        in_shape: (C, H, W) of the stage's input.
        mode: ``auto`` times both; ``ckernel`` forces the C kernel; anything else keeps dense.
    """
    w = stage.conv.weight
    density = float(torch.count_nonzero(w)) / w.numel() if w.numel() else 1.0
    out = {"density": round(density, 6), "batch_size": int(batch_size)}
    if mode == "ckernel":
        return {"storage": "ckernel", "reason": "forced by --sparse ckernel", **out}
    if mode != "auto":
        return {"storage": "dense", "reason": "convolution: dense kernels (nn.Conv2d)", **out}
    x = torch.rand(batch_size, *in_shape, generator=torch.Generator().manual_seed(0))
    dense = stage.as_dense()
    t = {"dense_ms": _time(lambda: dense(x), repeats)}
    _time_kernel(stage, in_shape, x, repeats, t)
    out.update({k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()})
    storage, reason = _decide(t, ["dense"] + (["ckernel"] if "ckernel_ms" in t else []), margin, batch_size)
    if "ckernel_unavailable" in t:
        reason += f"; no C kernel: {t['ckernel_unavailable']}"
    return {"storage": storage, "reason": reason, **out}
