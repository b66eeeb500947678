"""Storage size of a SparseMLP, SparseCNN or SparseGraph in the forms of Deep Compression
(Han, Mao, Dally 2016).

Every form counts, per weight layer, the weights in its own way plus the same
per-unit vectors at 32 bits: the bias (``out`` floats) and, for a layer whose outputs
a batch norm normalizes (:meth:`~nestsynth.sparse.network.MaskedLayers.norm_entries`:
a chain's hidden layers with batch norm), the folded per-unit scale (``out`` floats;
inference computes ``scale * (W x) + folded bias``, so sharing applies to ``W``
unchanged).  A graph network's layers are its ``layers`` in graph order, named by
their module paths.  A layer whose outputs a batch norm normalizes after a
concatenation is charged its ``out`` scale values the same way; each of the ``k``
layers whose outputs enter a batch norm of a residual sum is charged ``out`` scale
values too: ``2k`` values per unit, exact for ``k = 2`` (two biases, the norm's scale
and shift) and ``k - 2`` above what inference needs for ``k > 2``.  A conv layer
whose partial-area mask (NeST's Algorithm 2) switches off output positions also stores
that mask, one bit per output position (``out * H_out * W_out`` bits), in every form;
a full area needs nothing.  A layer's bits are rounded up to whole bytes; the model's
bytes are the sum over layers.

Conv layers: a kernel (out, in, k, k) is stored as the (out, in*k*k) matrix of its
flattened kernels (row ``o`` = output channel ``o``'s kernels, column ``c*k*k + i*k + j``),
so ``(out, in)`` below reads ``(out, in*k*k)`` and the row-major positions are those of
the flattened weight tensor.  Deep Compression uses 8-bit relative indices for conv
layers and 5 for fc layers (§2); ``conv_index_bits`` sets the conv layers' gap width
(default: ``index_bits`` for every layer).

Forms (``n`` = active weights of a layer, ``(out, in)`` its matrix shape):

* ``dense``: 32-bit floats for all ``out * in`` weights, zeros included.
* ``csr``: 32-bit values, one column index per value and ``out + 1`` row pointers,
  both at the *minimal* width: ``ceil(log2(in))`` bits per column index and
  ``bit_length(n)`` bits per row pointer (at least 1 bit each).
* ``relative`` (Deep Compression §2, Fig. 2): the active weights in row-major order
  of the (out, in) matrix as one sequence of entries; each entry stores a 32-bit
  value and an ``index_bits``-bit gap ``z`` = number of zeros since the previous
  entry (the first counts from the start), ``0 <= z < 2**index_bits``.  A longer run
  of zeros is split by *filler* entries of value zero, one per ``2**index_bits``
  zeros (``floor(z / 2**index_bits)`` fillers for a run of ``z``); fillers are counted
  as entries.  Zeros after the last entry need nothing (the shape is known).
* ``shared`` (§3): as ``relative`` but each entry stores a weight *index* into the
  layer's codebook instead of the value, plus the 32-bit codebook of ``k`` centroids.
  The index alphabet is the ``k`` centroids plus, if the layer has fillers, one code
  for the filler zero (its value is implied, not stored); index width =
  ``ceil(log2(alphabet))`` bits (at least 1).  With ``k = 2**bits`` centroids and
  fillers this is ``bits + 1``.
* ``huffman`` (§4): the entries' weight indices and gaps Huffman-coded separately per
  layer (canonical codes built from the layer's own frequencies), plus the 32-bit
  codebook and both code tables counted as in :meth:`HuffmanCode.table_bits`
  (8 bits + one code length per alphabet symbol; the gap alphabet has ``2**index_bits``
  symbols, the weight-index alphabet as for ``shared``).
"""

from __future__ import annotations

import math

import torch

from ..metrics import _layer_names
from ..sparse import MaskedConv2d, SparseCNN, SparseMLP
from .huffman import build_code
from .sharing import SharedLayer

FLOAT_BITS = 32
FORMS = ("dense", "csr", "relative", "shared", "huffman")


def width_for(n_symbols: int) -> int:
    """Bits of a fixed-width code for ``n_symbols`` symbols (at least 1)."""
    return max(1, (max(n_symbols, 1) - 1).bit_length())


def relative_entries(positions: torch.Tensor, index_bits: int) -> tuple[list[int], list[bool]]:
    """The gap of every entry of the relative-index format, fillers included.

    Args:
        positions: (n,) ascending flat positions of the active weights.
        index_bits: bits per gap.

    Returns:
        (gaps, is_filler): one gap ``z`` (zeros before the entry, ``< 2**index_bits``)
        per entry, and whether the entry is a zero filler.
    """
    span = 2 ** index_bits  # a filler absorbs span - 1 zeros and is itself one zero
    gaps, filler, prev = [], [], -1
    for pos in positions.tolist():
        z = pos - prev - 1
        while z >= span:
            gaps.append(span - 1)
            filler.append(True)
            z -= span
        gaps.append(z)
        filler.append(False)
        prev = pos
    return gaps, filler


def unit_vectors(model: SparseMLP | SparseCNN, i: int) -> int:
    """Number of 32-bit per-unit values stored for layer i: bias, plus BN scale if a batch
    norm normalizes its outputs (``model.norm_entries(i)``)."""
    out = model.layers[i].out_features
    return out * (2 if model.norm_entries(i) is not None else 1)


def area_bits(model: SparseMLP | SparseCNN, i: int) -> int:
    """Bits of layer i's partial-area mask: one per output position, 0 when the area is full."""
    layer = model.layers[i]
    if not isinstance(layer, MaskedConv2d) or bool(layer.area.all()):
        return 0
    return layer.area.numel()


def layer_bits(model: SparseMLP | SparseCNN, i: int, shared: SharedLayer, index_bits: int) -> dict:
    """Bits of every form for layer i, with the counts they derive from.

    Returns:
        dict with ``bits`` (form -> bits), ``huffman_parts`` (an ``area`` part only for a
        partial-area conv layer) and the counts (active, fillers, clusters, index_width).
    """
    out_f, in_f = shared.matrix_shape  # conv: (out, in*k*k)
    n, k = len(shared.positions), len(shared.centroids)
    area = area_bits(model, i)
    extra = FLOAT_BITS * unit_vectors(model, i) + area
    gaps, filler = relative_entries(shared.positions, index_bits)
    n_fill = sum(filler)
    entries = n + n_fill
    # weight-index symbols: cluster ids, fillers use the extra code k
    it = iter(shared.index.tolist())
    symbols = [k if f else next(it) for f in filler]
    alphabet = k + (1 if n_fill else 0)
    width = width_for(alphabet)
    codebook = FLOAT_BITS * k
    wcode, gcode = build_code(symbols), build_code(gaps)
    huff = {"weights": wcode.size_bits(symbols), "gaps": gcode.size_bits(gaps), "codebook": codebook,
            "tables": wcode.table_bits(alphabet) + gcode.table_bits(2 ** index_bits), "biases": extra - area}
    if area:
        huff["area"] = area
    bits = {
        "dense": FLOAT_BITS * out_f * in_f + extra,
        "csr": n * (FLOAT_BITS + width_for(in_f)) + (out_f + 1) * max(1, n.bit_length()) + extra,
        "relative": entries * (FLOAT_BITS + index_bits) + extra,
        "shared": entries * (width + index_bits) + codebook + extra,
        "huffman": sum(huff.values()),
    }
    return {"bits": bits, "huffman_parts": huff, "active": n, "fillers": n_fill, "clusters": k,
            "index_width": width}


def storage_report(model: SparseMLP | SparseCNN, shared: list[SharedLayer], index_bits: int = 5,
                   conv_index_bits: int | None = None) -> dict:
    """Bytes of every storage form, per layer and in total, and the ratios vs dense.

    Args:
        model: the model (for shapes, biases, batch norm and area masks).
        shared: its shared form (:func:`share_weights`), which fixes the active positions.
        index_bits: bits per relative index (gap); 5 for fc layers in Deep Compression.
        conv_index_bits: bits per gap of the conv layers (None: ``index_bits``; Deep
            Compression uses 8).

    Returns:
        ``{"layers": [...], "bytes": {form: total}, "ratio": {form: dense/form}}``; each
        layer has ``name`` (conv1.., fc1..), ``shape`` (the stored (out, in) matrix; a conv
        layer also has ``weight_shape`` (out, in, k, k), ``index_bits`` and, if partial,
        ``area_bits``), ``bytes`` per form, the counts and the Huffman breakdown in bits.
    """
    layers = []
    for i, (name, s) in enumerate(zip(_layer_names(model), shared)):
        conv = isinstance(model.layers[i], MaskedConv2d)
        gap_bits = conv_index_bits if (conv and conv_index_bits is not None) else index_bits
        info = layer_bits(model, i, s, gap_bits)
        row = {"name": name, "shape": list(s.matrix_shape), "active": info["active"],
               "fillers": info["fillers"], "clusters": info["clusters"],
               "index_width": info["index_width"],
               "bytes": {f: math.ceil(b / 8) for f, b in info["bits"].items()},
               "huffman_bits": info["huffman_parts"]}
        if conv:
            row.update(weight_shape=list(s.shape), index_bits=gap_bits)
            if area_bits(model, i):
                row["area_bits"] = area_bits(model, i)
        layers.append(row)
    total = {f: sum(layer["bytes"][f] for layer in layers) for f in FORMS}
    ratio = {f: total["dense"] / total[f] if total[f] else None for f in FORMS}
    return {"index_bits": index_bits, "layers": layers, "bytes": total, "ratio": ratio}
