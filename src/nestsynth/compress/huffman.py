"""Canonical Huffman coding of a sequence of non-negative integer symbols.

Deep Compression (Han, Mao, Dally 2016, §4) Huffman-codes the quantized weight
indices and the sparse index gaps of every layer.  This module builds an optimal
prefix code from the symbol frequencies (Huffman 1952), turns it into the
*canonical* code (codes assigned in order of (length, symbol), so the code lengths
alone describe it), packs a sequence into bytes (most significant bit first, the
last byte zero-padded) and decodes it back exactly.

Single-symbol case: a sequence with one distinct symbol gets a 1-bit code
(``0``), so every symbol still costs one bit and decoding needs only the count.

Table size (:meth:`HuffmanCode.table_bits`): a canonical code is fully described
by the code length of every symbol of the alphabet ``0..A-1`` (length 0 = symbol
absent).  We count one 8-bit field holding the width ``l`` of a length field, then
``A`` fields of ``l`` bits, ``l`` = bit length of the longest code.  The alphabet
size ``A`` itself is implied by the format (the index widths), so it is not stored.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

TABLE_HEADER_BITS = 8  # the field that gives the width of each code-length entry


def huffman_lengths(freqs: Mapping[int, int]) -> dict[int, int]:
    """Code length of every symbol of an optimal (Huffman) prefix code.

    Args:
        freqs: symbol -> count; symbols with a count of 0 are left out.

    Returns:
        symbol -> code length in bits (1 for a lone symbol; {} for no symbols).
    """
    items = sorted((int(s), int(c)) for s, c in freqs.items() if c > 0)
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][0]: 1}
    # Heap of (weight, tie-breaker, symbols in the subtree); merging two subtrees
    # adds one bit to the code of every symbol below them.
    heap = [(c, i, [s]) for i, (s, c) in enumerate(items)]
    heapq.heapify(heap)
    lengths = {s: 0 for s, _ in items}
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical prefix code given by its code lengths.

    Attributes:
        lengths: symbol -> code length in bits.
    """

    lengths: dict[int, int]

    def codes(self) -> dict[int, tuple[int, int]]:
        """symbol -> (code value, length): canonical assignment in (length, symbol) order."""
        out, code, prev = {}, 0, 0
        for sym, length in sorted(self.lengths.items(), key=lambda kv: (kv[1], kv[0])):
            code <<= length - prev
            out[sym] = (code, length)
            code, prev = code + 1, length
        return out

    def size_bits(self, symbols: Iterable[int]) -> int:
        """Total length in bits of the encoded sequence (before byte padding)."""
        return sum(self.lengths[int(s)] for s in symbols)

    def encode(self, symbols: Sequence[int]) -> bytes:
        """Pack the codes of ``symbols`` into bytes, MSB first, last byte zero-padded.

        Raises:
            KeyError: a symbol that has no code.
        """
        codes = self.codes()
        bits = "".join(format(code, f"0{length}b") for code, length in (codes[int(s)] for s in symbols))
        if not bits:
            return b""
        bits += "0" * (-len(bits) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big")

    def decode(self, data: bytes, count: int) -> list[int]:
        """The first ``count`` symbols encoded in ``data``.

        Raises:
            ValueError: ``data`` ends before ``count`` symbols or holds an invalid code.
        """
        by_code = {(length, code): sym for sym, (code, length) in self.codes().items()}
        longest = max(self.lengths.values(), default=0)
        bits = format(int.from_bytes(data, "big"), f"0{8 * len(data)}b") if data else ""
        out, pos = [], 0
        while len(out) < count:
            code, length = 0, 0
            while True:
                if pos >= len(bits) or length >= longest:
                    raise ValueError("the Huffman data is truncated or not encoded with this code.")
                code, length, pos = (code << 1) | (bits[pos] == "1"), length + 1, pos + 1
                if (length, code) in by_code:
                    out.append(by_code[(length, code)])
                    break
        return out

    def table_bits(self, alphabet_size: int) -> int:
        """Bits to store this code: an 8-bit field width, then one length per alphabet symbol.

        Args:
            alphabet_size: number of possible symbols ``0..A-1`` (implied by the format).
        """
        if not self.lengths:
            return 0
        width = max(self.lengths.values()).bit_length()
        return TABLE_HEADER_BITS + alphabet_size * width


def build_code(symbols: Iterable[int]) -> HuffmanCode:
    """The canonical Huffman code of a symbol sequence (from its own frequencies)."""
    return HuffmanCode(huffman_lengths(Counter(int(s) for s in symbols)))


def entropy_bits(symbols: Sequence[int]) -> float:
    """Shannon entropy of the empirical symbol distribution, in bits per symbol."""
    n = len(symbols)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(int(s) for s in symbols).values())
