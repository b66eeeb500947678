"""C source generated from a compact model's frozen sparsity pattern, compiled and called via ctypes.

A run of consecutive compact layers (linear, and conv stages with their area mask,
offset map, activation and pooling) becomes one C function ``nest_forward``:

* the non-zero weights, their input-row offsets and the row pointers are ``static
  const`` arrays (CSR of the pattern; a conv kernel's non-zero ``(c, ky, kx)`` becomes
  the offset ``c * Hp * Wp + ky * Wp + kx`` into its padded input map);
* activations are **feature-major** inside a tile of ``NEST_TILE`` samples: buffer row
  r holds feature r of every sample of the tile, so each non-zero is one multiply-add
  over the tile (``acc[b] += w * x_r[b]``), a loop the compiler vectorizes;
* bias, area mask, offset map, activation and pooling are applied in the same pass;
  the input is gathered (only the rows that some weight reads) and transposed into
  the first buffer, the last buffer is transposed back to ``(n, outputs)``;
* each layer is emitted twice, for a full tile (constant trip count) and for the last,
  partial tile (``m`` samples), so batch 1 computes one lane, not ``NEST_TILE``.

Each output sums its non-zeros in CSR order (as the CSR storage does), so it differs
from the masked model's dense product by float32 rounding only; the export check
bounds that difference as for every storage.

:func:`c_source` writes the plain-C99 text (also the dependency-free ``--format c``
artifact, with a harness ``main`` under ``#ifdef NEST_MAIN``); :func:`build_library`
compiles it with the system C compiler into a shared library cached by the hash of
source, compiler and flags; :class:`CKernel` calls it.  Without a working compiler
:class:`KernelUnavailable` says why in one line.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NestError

CC_ENV = "NESTSYNTH_CC"                 # compiler to use (default: cc); a missing one disables the kernel
CACHE_ENV = "NESTSYNTH_KERNEL_CACHE"    # folder of compiled kernels (default ~/.cache/nestsynth/kernels)
DEFAULT_CC = "cc"
#: Tried in order; the first set the compiler accepts is used.  ``-march=native`` is
#: safe here because the library is built on the machine that loads it (the cache key
#: holds the CPU's flags), and it is the fastest (BENCHMARKS.md, "Which kernel").
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
TILE = 32                               # samples per tile of the runtime kernel (measured: bench/sparse_kernels.py)
COMPILE_TIMEOUT_S = 120
C_ACTIVATIONS = ("relu", "leaky_relu", "identity")


class KernelUnavailable(NestError):
    """The C kernel cannot be generated or built here (the message is one line)."""


# ---------------------------------------------------------------------------- plan


@dataclass
class Stage:
    """One step of the generated forward: ``fc``, ``conv`` or ``pool`` (which also re-pads).

    ``in_rows`` / ``out_rows``: buffer rows read and written (one row = one feature of
    every sample of the tile).  Fields not used by a kind keep their defaults.
    """

    kind: str
    in_rows: int
    out_rows: int
    act: str | None = None
    values: list = field(default_factory=list)      # non-zero weights, CSR order
    offsets: list = field(default_factory=list)     # input-row offset of each non-zero
    ptr: list = field(default_factory=list)         # (units + 1,) row pointers
    bias: list = field(default_factory=list)
    geometry: dict = field(default_factory=dict)    # conv / pool: shapes, stride, padding, window
    area: list | None = None                        # conv: (units * positions,) 0/1
    offset_map: list | None = None                  # conv: (units * positions,) added after the area


def _check_activation(spec: str | None) -> None:
    """Raise KernelUnavailable for an activation the generated C cannot compute."""
    if spec is not None and spec.partition(":")[0] not in C_ACTIVATIONS:
        raise KernelUnavailable(f"activation {spec!r} has no C form (C kernels support "
                                f"{', '.join(C_ACTIVATIONS)}).")


def _csr(weight: torch.Tensor, offset_of) -> tuple[list, list, list]:
    """(values, offsets, row pointers) of the non-zeros of ``weight`` (units, ...), row-major order.

    ``offset_of(flat_index)`` maps a non-zero's flat index within its row to its input-row offset.
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    values, offsets, ptr = [], [], [0]
    for row in w:
        idx = torch.nonzero(row).flatten().tolist()
        values += row[idx].tolist()
        offsets += [offset_of(j) for j in idx]
        ptr.append(len(values))
    return values, offsets, ptr


def _fc_stage(layer, in_rows: int, remap: dict | None = None) -> Stage:
    values, offsets, ptr = _csr(layer.dense_weight(), (lambda j: remap[j]) if remap else (lambda j: j))
    return Stage("fc", in_rows, layer.out_features, layer.activation, values, offsets, ptr,
                 layer.bias.detach().float().tolist())


def _conv_stages(layer, in_shape: tuple[int, int, int], next_pad: int) -> tuple[list[Stage], tuple]:
    """The conv stage (and its pool / re-pad stage) of a CompactConv2d; returns (stages, output shape).

    ``in_shape`` = (channels, H, W) unpadded; the stage reads them padded by the layer's padding.
    """
    c, h, w = in_shape
    k, s, pad = layer.kernel_size, layer.stride, layer.padding
    hp, wp = h + 2 * pad, w + 2 * pad
    ho, wo = layer.out_hw

    def offset_of(j: int) -> int:  # j = (ci * k + ky) * k + kx within the kernel
        ci, rest = divmod(j, k * k)
        ky, kx = divmod(rest, k)
        return ci * hp * wp + ky * wp + kx

    values, offsets, ptr = _csr(layer.conv.weight, offset_of)
    geo = {"k": k, "stride": s, "hp": hp, "wp": wp, "ho": ho, "wo": wo}
    units = layer.out_features
    area = None if layer.area is None else [int(v != 0) for v in layer.area.flatten().tolist()]
    offset = None if layer.offset is None else layer.offset.flatten().tolist()
    conv = Stage("conv", c * hp * wp, units * ho * wo, layer.activation, values, offsets, ptr,
                 layer.conv.bias.detach().float().tolist(), geo, area, offset)
    stages, shape = [conv], (units, ho, wo)
    if layer.pool_spec or next_pad:
        kind, pk, ps = (layer.pool_spec.split(":") if layer.pool_spec else ["copy", "1", "1"])
        pk, ps = int(pk), int(ps or pk)
        oh, ow = (ho - pk) // ps + 1, (wo - pk) // ps + 1
        geo_p = {"pool": kind, "k": pk, "stride": ps, "h": ho, "w": wo, "oh": oh, "ow": ow, "pad": next_pad}
        stages.append(Stage("pool", units * ho * wo, units * (oh + 2 * next_pad) * (ow + 2 * next_pad),
                            geometry=geo_p))
        shape = (units, oh, ow)
    return stages, shape


@dataclass
class Plan:
    """A run of layers as stages: what :func:`c_source` writes.

    ``n_inputs``: floats per sample the kernel reads (its input, flattened, before any
    gather); ``gather``: for each row of the first buffer, the input position it copies
    (-1: a zero padding row); ``out_shape``: per-sample shape of the output.
    """

    n_inputs: int
    gather: list[int]
    stages: list[Stage]
    out_shape: tuple

    @property
    def n_outputs(self) -> int:
        return math.prod(self.out_shape)

    @property
    def max_rows(self) -> int:
        return max([len(self.gather)] + [s.out_rows for s in self.stages])


def plan_layers(layers, in_shape, input_index: torch.Tensor | None = None) -> Plan:
    """Stages of ``layers`` (CompactConv2d stages, then CompactLinear layers, or any sub-run).

    Args:
        layers: the run, in order.
        in_shape: per-sample shape of the run's input as it arrives, before ``input_index``:
            (C, H, W) in front of a conv layer, (features,) in front of a linear one.
        input_index: the gather in front of the run (conv: channels, linear: features), or None.

    Raises:
        KernelUnavailable: an activation without a C form.
    """
    in_shape = tuple(int(v) for v in in_shape)
    for layer in layers:
        _check_activation(layer.activation)
    first, index = layers[0], None if input_index is None else input_index.tolist()
    if first.type_name == "conv2d":
        _, h, w = in_shape
        pad = first.padding
        channels = index if index is not None else range(in_shape[0])
        gather = [ch * h * w + y * w + x if 0 <= y < h and 0 <= x < w else -1
                  for ch in channels for y in range(-pad, h + pad) for x in range(-pad, w + pad)]
        stages, shape = [], (len(channels), h, w)
    else:
        # without a gather in front every input is a row (the transposition is then fastest)
        read = range(first.in_features) if index is None else \
            sorted(set(torch.nonzero(first.dense_weight())[:, 1].tolist()))
        gather = [index[j] if index is not None else j for j in read]
        stages, shape = [_fc_stage(first, len(read), {j: r for r, j in enumerate(read)})], (first.out_features,)
        layers = layers[1:]
    for i, layer in enumerate(layers):
        if layer.type_name == "conv2d":
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            new, shape = _conv_stages(layer, shape, nxt.padding if nxt is not None and nxt.type_name == "conv2d"
                                      else 0)
            stages += new
        else:
            stages.append(_fc_stage(layer, math.prod(shape)))
            shape = (layer.out_features,)
    return Plan(math.prod(in_shape), gather, stages, shape)


# ---------------------------------------------------------------------------- C text


def _float(v: float) -> str:
    """A C float literal that reads back as the same float32 (9 significant digits)."""
    if not math.isfinite(v):
        raise KernelUnavailable(f"a weight or bias is {v}: no C literal is written for it.")
    text = f"{v:.9g}"
    return text + ("f" if any(c in text for c in ".e") else ".0f")


def _array(ctype: str, name: str, items: list, per_line: int = 8) -> str:
    """``static const ctype name[n] = {...};`` (one dummy element when empty: C has no empty arrays)."""
    fmt = _float if ctype == "float" else str
    cells = [fmt(v) for v in items] or [fmt(0)]
    lines = [", ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]
    return f"static const {ctype} {name}[{len(cells)}] = {{\n  " + ",\n  ".join(lines) + "\n};\n"


def _index_type(items: list) -> str:
    return "unsigned short" if not items or (min(items) >= 0 and max(items) < 65536) else "int"


@dataclass(frozen=True)
class Lanes:
    """How a stage function touches the lanes (samples) of a buffer row.

    ``vec``: a full tile as GNU C vectors of ``NEST_VL`` floats; ``full``: a full tile,
    plain C loops; ``one``: a single sample in buffers of one float per row (partial
    tiles run sample by sample).
    """

    mode: str

    @property
    def count(self) -> str:
        return {"vec": "NEST_TILE / NEST_VL", "full": "NEST_TILE", "one": "1"}[self.mode]

    @property
    def type(self) -> str:
        return "nest_vf" if self.mode == "vec" else "float"

    @property
    def suffix(self) -> str:
        return "one" if self.mode == "one" else "full"

    @property
    def stride(self) -> str:
        """Floats between consecutive buffer rows: a tile's lanes, or 1 for a single sample."""
        return "1" if self.mode == "one" else "NEST_TILE"

    def loop(self) -> str:
        return f"for (int v = 0; v < {self.count}; ++v)"

    def load(self, ptr: str) -> str:
        return f"((const nest_vf *)({ptr}))[v]" if self.mode == "vec" else f"({ptr})[v]"

    def store(self, ptr: str, expr: str) -> str:
        return f"((nest_vf *)({ptr}))[v] = {expr}" if self.mode == "vec" else f"({ptr})[v] = {expr}"

    def splat(self, scalar: str) -> str:
        return f"((nest_vf){{0}} + ({scalar}))" if self.mode == "vec" else f"({scalar})"

    def select(self, cond: str, a: str, b: str) -> str:
        """``cond ? a : b`` lane-wise (``cond`` compares lanes)."""
        if self.mode != "vec":
            return f"({cond} ? {a} : {b})"
        m = f"(nest_vi)({cond})"
        return f"(nest_vf)(((nest_vi)({a}) & {m}) | ((nest_vi)({b}) & ~{m}))"

    def act(self, spec: str | None, v: str) -> str:
        """The activation of ``v`` (a variable) as an expression."""
        _check_activation(spec)
        name, _, arg = (spec or "").partition(":")
        zero = self.splat("0.0f")
        if name == "relu":
            return self.select(f"{v} > {zero}", v, zero)
        if name == "leaky_relu":
            return self.select(f"{v} > {zero}", v, f"{v} * {float(arg or 0.01)!r}f")
        return v


def _fc_c(i: int, st: Stage, ln: Lanes) -> str:
    return f"""static void nest_s{i}_{ln.suffix}(const float *restrict in, float *restrict out) {{
  for (int o = 0; o < {st.out_rows}; ++o) {{
    {ln.type} acc[{ln.count}];
    const float bo = nest_b{i}[o];
    {ln.loop()} acc[v] = {ln.splat("bo")};
    for (int k = nest_p{i}[o]; k < nest_p{i}[o + 1]; ++k) {{
      const float wk = nest_w{i}[k];
      const float *restrict xk = in + (size_t)nest_o{i}[k] * {ln.stride};
      {ln.loop()} acc[v] += wk * {ln.load("xk")};
    }}
    float *restrict yo = out + (size_t)o * {ln.stride};
    {ln.loop()} {{ const {ln.type} r = acc[v]; {ln.store("yo", ln.act(st.act, "r"))}; }}
  }}
}}
"""


def _conv_c(i: int, st: Stage, ln: Lanes) -> str:
    if ln.mode == "one":
        return _conv_one_c(i, st)
    g = st.geometry
    positions = g["ho"] * g["wo"]
    skip = (f"if (!nest_a{i}[o * {positions} + p]) {{ {ln.loop()} acc[v] = {ln.splat('0.0f')}; }}\n"
            "      else ") if st.area is not None else ""
    offset = f" + nest_m{i}[o * {positions} + p]" if st.offset_map is not None else ""
    return f"""static void nest_s{i}_{ln.suffix}(const float *restrict in, float *restrict out) {{
  for (int o = 0; o < {len(st.bias)}; ++o) {{
    const float bo = nest_b{i}[o];
    for (int py = 0; py < {g['ho']}; ++py) for (int px = 0; px < {g['wo']}; ++px) {{
      const int p = py * {g['wo']} + px;
      {ln.type} acc[{ln.count}];
      {skip}{{
        const float *restrict xb = in + (size_t)(py * {g['stride']} * {g['wp']} + px * {g['stride']}) * NEST_TILE;
        {ln.loop()} acc[v] = {ln.splat("bo")};
        for (int k = nest_p{i}[o]; k < nest_p{i}[o + 1]; ++k) {{
          const float wk = nest_w{i}[k];
          const float *restrict xk = xb + (size_t)nest_o{i}[k] * NEST_TILE;
          {ln.loop()} acc[v] += wk * {ln.load("xk")};
        }}
      }}
      float *restrict yo = out + (size_t)(o * {positions} + p) * NEST_TILE;
      {ln.loop()} {{ const {ln.type} r = acc[v]{offset}; {ln.store("yo", ln.act(st.act, "r"))}; }}
    }}
  }}
}}
"""


def _conv_one_c(i: int, st: Stage) -> str:
    """A conv stage for one sample: each non-zero is one multiply-add over a row of output positions."""
    g = st.geometry
    positions = g["ho"] * g["wo"]
    lanes = Lanes("one")
    keep = f"nest_a{i}[o * {positions} + py * {g['wo']} + px] ? acc[px] : 0.0f" if st.area is not None else "acc[px]"
    offset = f" + nest_m{i}[o * {positions} + py * {g['wo']} + px]" if st.offset_map is not None else ""
    return f"""static void nest_s{i}_one(const float *restrict in, float *restrict out) {{
  for (int o = 0; o < {len(st.bias)}; ++o) {{
    const float bo = nest_b{i}[o];
    for (int py = 0; py < {g['ho']}; ++py) {{
      float acc[{g['wo']}];
      const float *restrict xb = in + (size_t)py * {g['stride'] * g['wp']};
      for (int px = 0; px < {g['wo']}; ++px) acc[px] = bo;
      for (int k = nest_p{i}[o]; k < nest_p{i}[o + 1]; ++k) {{
        const float wk = nest_w{i}[k];
        const float *restrict xk = xb + nest_o{i}[k];
        for (int px = 0; px < {g['wo']}; ++px) acc[px] += wk * xk[px * {g['stride']}];
      }}
      float *restrict yo = out + (size_t)(o * {positions} + py * {g['wo']});
      for (int px = 0; px < {g['wo']}; ++px) {{ const float r = ({keep}){offset}; yo[px] = {lanes.act(st.act, "r")}; }}
    }}
  }}
}}
"""


def _pool_c(i: int, st: Stage, ln: Lanes) -> str:
    g = st.geometry
    pad, ph, pw = g["pad"], g["oh"] + 2 * g["pad"], g["ow"] + 2 * g["pad"]
    units = st.in_rows // (g["h"] * g["w"])
    xi = ln.load("xi")
    if g["pool"] == "max":
        init, step, final = ln.load("x0"), ln.select(f"{xi} > acc[v]", xi, "acc[v]"), "acc[v]"
    elif g["pool"] == "avg":
        init, step, final = ln.splat("0.0f"), f"acc[v] + {xi}", f"acc[v] / {float(g['k'] ** 2)!r}f"
    else:  # copy into a padded layout
        init, step, final = ln.load("x0"), "", "acc[v]"
    zero = (f"  for (size_t r = 0; r < (size_t){units * ph * pw}; ++r) {{ float *restrict z = out + r * {ln.stride}; "
            f"{ln.loop()} {ln.store('z', ln.splat('0.0f'))}; }}\n") if pad else ""
    window = (f"""    for (int dy = 0; dy < {g['k']}; ++dy) for (int dx = 0; dx < {g['k']}; ++dx) {{
      const float *restrict xi = x0 + (size_t)(dy * {g['w']} + dx) * {ln.stride};
      {ln.loop()} acc[v] = {step};
    }}
""" if step else "")
    return f"""static void nest_s{i}_{ln.suffix}(const float *restrict in, float *restrict out) {{
{zero}  for (int c = 0; c < {units}; ++c) for (int y = 0; y < {g['oh']}; ++y) for (int x = 0; x < {g['ow']}; ++x) {{
    const float *restrict x0 =
      in + (size_t)((c * {g['h']} + y * {g['stride']}) * {g['w']} + x * {g['stride']}) * {ln.stride};
    {ln.type} acc[{ln.count}];
    {ln.loop()} acc[v] = {init};
{window}    float *restrict yo = out + (size_t)((c * {ph} + y + {pad}) * {pw} + x + {pad}) * {ln.stride};
    {ln.loop()} {ln.store("yo", final)};
  }}
}}
"""


_STAGE_C = {"fc": _fc_c, "conv": _conv_c, "pool": _pool_c}

HARNESS = r"""
#ifdef NEST_MAIN
/* Harness: reads samples of NEST_N_INPUTS whitespace-separated numbers from stdin
 * (already scaled as the input contract above says) and prints one line of
 * NEST_N_OUTPUTS outputs per sample. */
#include <stdio.h>
static float nest_scratch[NEST_SCRATCH_FLOATS];
int main(void) {
  static float x[NEST_N_INPUTS];
  float y[NEST_N_OUTPUTS];
  for (;;) {
    for (int i = 0; i < NEST_N_INPUTS; ++i) {
      if (scanf("%f", &x[i]) != 1) {
        if (i == 0) return 0;
        fprintf(stderr, "nest: a sample needs %d numbers, got %d\n", NEST_N_INPUTS, i);
        return 1;
      }
    }
    nest_forward(x, 1, y, nest_scratch);
    for (int o = 0; o < NEST_N_OUTPUTS; ++o) printf(o ? " %.9g" : "%.9g", (double)y[o]);
    printf("\n");
  }
}
#endif
"""


def _constants(i: int, st: Stage) -> str:
    if st.kind == "pool":
        return ""
    text = (_array("float", f"nest_w{i}", st.values) + _array(_index_type(st.offsets), f"nest_o{i}", st.offsets)
            + _array(_index_type(st.ptr), f"nest_p{i}", st.ptr) + _array("float", f"nest_b{i}", st.bias))
    if st.area is not None:
        text += _array("unsigned char", f"nest_a{i}", st.area, per_line=32)
    if st.offset_map is not None:
        text += _array("float", f"nest_m{i}", st.offset_map)
    return text


PRELUDE = r"""#include <stddef.h>

#ifndef NEST_TILE
#define NEST_TILE {tile}
#endif
/* GNU C vectors (gcc, clang) for full tiles, 8 floats with AVX, else 4 (SSE, NEON);
 * -DNEST_PLAIN_C keeps plain C99 loops. */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(NEST_PLAIN_C) && NEST_TILE % 8 == 0
#define NEST_VECTOR 1
#ifdef __AVX__
#define NEST_VL 8
#else
#define NEST_VL 4
#endif
typedef float nest_vf __attribute__((vector_size(NEST_VL * 4), may_alias, aligned(4)));
typedef int nest_vi __attribute__((vector_size(NEST_VL * 4), may_alias, aligned(4)));
#if defined(__clang__) || __GNUC__ >= 12
#define NEST_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define NEST_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, (nest_vi){{i0, i1, i2, i3, i4, i5, i6, i7}})
#endif
#endif
"""

GATHER = r"""
/* Rows of the first buffer <- the input (n, NEST_N_INPUTS), transposed: row r = input nest_gather[r]. */
static void nest_gather_in(const float *restrict x, int m, float *restrict buf, int ld) {
  for (int r = 0; r < NEST_GATHER_ROWS; ++r) {
    const int src = nest_gather[r];
    float *restrict row = buf + (size_t)r * ld;
    if (src < 0) { for (int b = 0; b < m; ++b) row[b] = 0.0f; continue; }
    for (int b = 0; b < m; ++b) row[b] = x[(size_t)b * NEST_N_INPUTS + src];
  }
}

#if defined(NEST_VECTOR) && NEST_VL == 8 && NEST_GATHER_IDENTITY
/* The same for a full tile when row r is input r: 8 x 8 blocks transposed in registers. */
static void nest_gather_full(const float *restrict x, float *restrict buf) {
  int c = 0;
  for (; c + 8 <= NEST_N_INPUTS; c += 8)
    for (int b = 0; b < NEST_TILE; b += 8) {
      const float *restrict p = x + (size_t)b * NEST_N_INPUTS + c;
      const nest_vf v0 = *(const nest_vf *)(p), v1 = *(const nest_vf *)(p + NEST_N_INPUTS);
      const nest_vf v2 = *(const nest_vf *)(p + 2 * NEST_N_INPUTS), v3 = *(const nest_vf *)(p + 3 * NEST_N_INPUTS);
      const nest_vf v4 = *(const nest_vf *)(p + 4 * NEST_N_INPUTS), v5 = *(const nest_vf *)(p + 5 * NEST_N_INPUTS);
      const nest_vf v6 = *(const nest_vf *)(p + 6 * NEST_N_INPUTS), v7 = *(const nest_vf *)(p + 7 * NEST_N_INPUTS);
      const nest_vf t0 = NEST_SHUF(v0, v1, 0, 8, 1, 9, 4, 12, 5, 13);
      const nest_vf t1 = NEST_SHUF(v0, v1, 2, 10, 3, 11, 6, 14, 7, 15);
      const nest_vf t2 = NEST_SHUF(v2, v3, 0, 8, 1, 9, 4, 12, 5, 13);
      const nest_vf t3 = NEST_SHUF(v2, v3, 2, 10, 3, 11, 6, 14, 7, 15);
      const nest_vf t4 = NEST_SHUF(v4, v5, 0, 8, 1, 9, 4, 12, 5, 13);
      const nest_vf t5 = NEST_SHUF(v4, v5, 2, 10, 3, 11, 6, 14, 7, 15);
      const nest_vf t6 = NEST_SHUF(v6, v7, 0, 8, 1, 9, 4, 12, 5, 13);
      const nest_vf t7 = NEST_SHUF(v6, v7, 2, 10, 3, 11, 6, 14, 7, 15);
      const nest_vf s0 = NEST_SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
      const nest_vf s1 = NEST_SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
      const nest_vf s2 = NEST_SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
      const nest_vf s3 = NEST_SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
      const nest_vf s4 = NEST_SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
      const nest_vf s5 = NEST_SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
      const nest_vf s6 = NEST_SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
      const nest_vf s7 = NEST_SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
      float *restrict q = buf + (size_t)c * NEST_TILE + b;
      *(nest_vf *)(q) = NEST_SHUF(s0, s4, 0, 1, 2, 3, 8, 9, 10, 11);
      *(nest_vf *)(q + NEST_TILE) = NEST_SHUF(s1, s5, 0, 1, 2, 3, 8, 9, 10, 11);
      *(nest_vf *)(q + 2 * NEST_TILE) = NEST_SHUF(s2, s6, 0, 1, 2, 3, 8, 9, 10, 11);
      *(nest_vf *)(q + 3 * NEST_TILE) = NEST_SHUF(s3, s7, 0, 1, 2, 3, 8, 9, 10, 11);
      *(nest_vf *)(q + 4 * NEST_TILE) = NEST_SHUF(s0, s4, 4, 5, 6, 7, 12, 13, 14, 15);
      *(nest_vf *)(q + 5 * NEST_TILE) = NEST_SHUF(s1, s5, 4, 5, 6, 7, 12, 13, 14, 15);
      *(nest_vf *)(q + 6 * NEST_TILE) = NEST_SHUF(s2, s6, 4, 5, 6, 7, 12, 13, 14, 15);
      *(nest_vf *)(q + 7 * NEST_TILE) = NEST_SHUF(s3, s7, 4, 5, 6, 7, 12, 13, 14, 15);
    }
  for (; c < NEST_N_INPUTS; ++c)
    for (int b = 0; b < NEST_TILE; ++b) buf[(size_t)c * NEST_TILE + b] = x[(size_t)b * NEST_N_INPUTS + c];
}
#else
static void nest_gather_full(const float *restrict x, float *restrict buf) {
  nest_gather_in(x, NEST_TILE, buf, NEST_TILE);
}
#endif

/* The output (n, NEST_N_OUTPUTS) <- the rows of the last buffer, transposed. */
static void nest_scatter(const float *restrict buf, int m, float *restrict y, int ld) {
  for (int o = 0; o < NEST_N_OUTPUTS; ++o)
    for (int b = 0; b < m; ++b) y[(size_t)b * NEST_N_OUTPUTS + o] = buf[(size_t)o * ld + b];
}

"""


def c_source(plan: Plan, tile: int = TILE, comment: str = "", defines: dict | None = None,
             harness: bool = False) -> str:
    """The C text of ``plan``: constants, the stage functions, ``nest_forward``.

    ``int nest_forward(const float *x, long n, float *y, float *scratch)`` reads ``n``
    samples of ``NEST_N_INPUTS`` floats (row-major) and writes ``n`` rows of
    ``NEST_N_OUTPUTS``; ``scratch`` holds ``NEST_SCRATCH_FLOATS`` floats.  Full tiles use
    GNU C vectors under gcc / clang (plain C99 loops otherwise or with ``-DNEST_PLAIN_C``);
    the last, partial tile runs sample by sample.

    Args:
        plan: from :func:`plan_layers`.
        tile: default ``NEST_TILE`` (samples per tile; ``-DNEST_TILE=...`` overrides it).
        comment: text of the leading comment block.
        defines: extra ``#define NAME VALUE`` lines (e.g. the input contract).
        harness: append a ``main`` (compiled with ``-DNEST_MAIN``) that reads stdin.
    """
    lines = "\n".join(f" * {line}".rstrip() for line in comment.splitlines())
    head = (f"/*\n{lines}\n */\n" if comment else "") + PRELUDE.format(tile=int(tile))
    identity = plan.gather == list(range(plan.n_inputs))
    consts = {"NEST_N_INPUTS": plan.n_inputs, "NEST_N_OUTPUTS": plan.n_outputs,
              "NEST_MAX_ROWS": max(plan.max_rows, 1), "NEST_GATHER_ROWS": len(plan.gather),
              "NEST_GATHER_IDENTITY": int(identity)}
    head += "".join(f"#define {k} {v}\n" for k, v in {**consts, **(defines or {})}.items())
    head += "#define NEST_SCRATCH_FLOATS (2 * NEST_MAX_ROWS * NEST_TILE)\n\n"
    body = _array("int", "nest_gather", plan.gather) + "".join(_constants(i, s) for i, s in enumerate(plan.stages))
    body += GATHER
    for i, st in enumerate(plan.stages):
        body += ("#ifdef NEST_VECTOR\n" + _STAGE_C[st.kind](i, st, Lanes("vec")) + "#else\n"
                 + _STAGE_C[st.kind](i, st, Lanes("full")) + "#endif\n\n" + _STAGE_C[st.kind](i, st, Lanes("one"))
                 + "\n")
    ab = ["a", "b"]
    last = ab[len(plan.stages) % 2]
    full = "".join(f"      nest_s{i}_full({ab[i % 2]}, {ab[1 - i % 2]});\n" for i in range(len(plan.stages)))
    one = "".join(f"      nest_s{i}_one({ab[i % 2]}, {ab[1 - i % 2]});\n" for i in range(len(plan.stages)))
    body += f"""int nest_forward(const float *restrict x, long n, float *restrict y, float *restrict scratch) {{
  float *restrict a = scratch;
  float *restrict b = scratch + (size_t)NEST_MAX_ROWS * NEST_TILE;
  for (long t = 0; t < n; t += NEST_TILE) {{
    const int m = n - t < NEST_TILE ? (int)(n - t) : NEST_TILE;
    if (m == NEST_TILE) {{
      nest_gather_full(x + (size_t)t * NEST_N_INPUTS, a);
{full}      nest_scatter({last}, m, y + (size_t)t * NEST_N_OUTPUTS, NEST_TILE);
      continue;
    }}
    for (long j = t; j < n; ++j) {{  /* the last, partial tile: one sample at a time */
      nest_gather_in(x + (size_t)j * NEST_N_INPUTS, 1, a, 1);
{one}      nest_scatter({last}, 1, y + (size_t)j * NEST_N_OUTPUTS, 1);
    }}
  }}
  return 0;
}}
"""
    return head + body + (HARNESS if harness else "")


# ---------------------------------------------------------------------------- build and call


def find_compiler() -> str:
    """Path of the C compiler (``$NESTSYNTH_CC``, default ``cc``).

    Raises:
        KernelUnavailable: not found.
    """
    name = os.environ.get(CC_ENV, DEFAULT_CC)
    path = shutil.which(name) if name else None
    if path is None:
        raise KernelUnavailable(f"no C compiler: {name or '(empty)'!r} not found (set {CC_ENV} to one).")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path("~/.cache/nestsynth/kernels").expanduser())


def _check_trusted(path: Path) -> None:
    """Refuse a cache folder or library that another user could have written: a library
    is loaded into the process, so it must be as trusted as the code itself.

    Raises:
        KernelUnavailable: ``path`` is not owned by this user or is group/world-writable.
    """
    if not hasattr(os, "getuid"):  # no POSIX ownership to check
        return
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise KernelUnavailable(f"{str(path)!r} is not owned by this user or is writable by others, so its "
                                f"kernels are not loaded (remove it, or set {CACHE_ENV} to a private folder).")


def _host_key(cc: str) -> str:
    """What a compiled library depends on besides its source: compiler version and CPU flags."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = ""
    return f"{cc}\n{version}\n{cpu}\n{os.uname().machine}"


def _compile(cc: str, source: Path, target: Path, flags: tuple, extra: tuple) -> str | None:
    """Compile ``source`` into ``target``; None on success, else the compiler's first error line."""
    cmd = [cc, *flags, *extra, str(source), "-o", str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0 and target.is_file():
        return None
    first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
    return first.strip() or f"exit status {done.returncode}"


def build(source: str, what: str = "library", flag_sets=FLAG_SETS) -> tuple[Path, tuple]:
    """Compile ``source`` (a shared library, or ``what="program"`` with ``-DNEST_MAIN``), cached.

    The file is ``cache_dir()/<sha256 of source, flags, compiler version, CPU flags>.so``
    (``.bin`` for a program), written atomically; the folder is created private (0700), and
    a folder or cached file that another user could have written is refused
    (:func:`_check_trusted`).

    Returns:
        (path, the flags used).

    Raises:
        KernelUnavailable: no compiler, or every flag set failed (the reason in one line).
    """
    cc = find_compiler()
    extra = ("-shared", "-fPIC") if what == "library" else ("-DNEST_MAIN",)
    host = _host_key(cc)
    folder = cache_dir()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256("\0".join([source, " ".join(flags + extra), host]).encode()).hexdigest()[:32]
        target = folder / f"{key}{'.so' if what == 'library' else '.bin'}"
        if target.is_file():
            _check_trusted(folder)
            _check_trusted(target)
            return target, flags
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_trusted(folder)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / "kernel.c"
                src.write_text(source)
                err = _compile(cc, src, Path(tmp) / target.name, flags, extra)
                if err is None:
                    os.replace(Path(tmp) / target.name, target)
                    return target, flags
        except OSError as exc:
            raise KernelUnavailable(f"cannot write the kernel cache {str(folder)!r} ({exc.strerror or exc}; "
                                    f"set {CACHE_ENV}).") from None
        errors.append(f"{' '.join(flags)}: {err}")
    raise KernelUnavailable(f"the C compiler {cc} failed ({'; '.join(errors)[:300]}).")


class CKernel:
    """A run of compact layers compiled into one C function; called like a module.

    Args:
        layers: CompactConv2d / CompactLinear layers, in order.
        in_shape: per-sample shape of the input as it arrives (before ``input_index``).
        input_index: the gather in front of the run, or None.
        tile: ``NEST_TILE`` of the build.
        source: the C text to build (default: :func:`c_source` of the layers); e.g. the
            ``--format c`` artifact of the same layers, to check exactly what was written.
        flag_sets: compiler flag sets to try, in order (see :data:`FLAG_SETS`).

    Raises:
        KernelUnavailable: an activation without a C form, no compiler, a failed build.
    """

    def __init__(self, layers, in_shape, input_index: torch.Tensor | None = None, tile: int = TILE,
                 source: str | None = None, flag_sets=FLAG_SETS):
        self.plan = plan_layers(list(layers), in_shape, input_index)
        self.tile = int(tile)
        self.source = source if source is not None else c_source(self.plan, self.tile)
        self.path, self.flags = build(self.source, flag_sets=flag_sets)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelUnavailable(f"the compiled kernel {self.path.name} does not load ({exc}).") from None
        self._fn = lib.nest_forward
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self._fn.restype = ctypes.c_int
        self._lib = lib
        self.n_inputs, self.out_shape = self.plan.n_inputs, tuple(self.plan.out_shape)
        self.scratch_floats = 2 * max(self.plan.max_rows, 1) * self.tile
        self._local = threading.local()  # one scratch buffer per thread (ctypes releases the GIL)

    def _scratch(self) -> torch.Tensor:
        buf = getattr(self._local, "scratch", None)
        if buf is None:
            buf = self._local.scratch = torch.empty(self.scratch_floats)
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ...) with n_inputs per sample -> (B, *out_shape)
        n = x.shape[0]
        x = x.reshape(n, -1)
        if x.shape[1] != self.n_inputs:
            raise NestError(f"the C kernel reads {self.n_inputs} values per sample, got {x.shape[1]}.")
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
            x = x.to(device="cpu", dtype=torch.float32).contiguous()
        y = torch.empty(n, *self.out_shape)
        self._fn(x.data_ptr(), n, y.data_ptr(), self._scratch().data_ptr())
        return y
