"""RadiX-Net sparse topologies (Robinett & Kepner 2019; trained by Alford et al. 2019, seed 002).

All functions are pure: they return 0/1 float masks in the layer orientation of
:class:`~nestsynth.sparse.MaskedLinear`, ``mask[out, in]``.

Definition followed
-------------------
*Mixed-radix topology.*  A mixed-radix numeral system ``N = (N_1, ..., N_L)`` with
``N' = N_1 * ... * N_L`` defines ``L`` layers of edges between ``L + 1`` layers of ``N'``
nodes.  Layer ``i`` (0-based) has place value ``nu_i = N_1 * ... * N_i`` (``nu_0 = 1``) and
connects node ``j`` to the ``N_{i+1}`` nodes ``(j + k * nu_i) mod N'``, ``k = 0 .. N_{i+1}-1``:
every node has exactly ``N_{i+1}`` inputs and outputs (density ``N_{i+1} / N'``).  Because
every offset ``d in [0, N')`` has exactly one mixed-radix representation
``d = sum_i k_i nu_i`` with ``0 <= k_i < N_{i+1}``, every input node reaches every output
node through exactly one path: the product of the layer matrices is the all-ones matrix.
Radices (2, 2, 2): ``N' = 8``, 2 of 8 connections per node, 75% sparsity (seed 002's figure).

*Extended mixed-radix (EMR) topology.*  Several systems ``N^(1), ..., N^(M)`` are
concatenated (their layers follow one another, each system's place values restart at 1).
All systems multiply to the same ``N'`` except the last, whose product must divide
``N'`` (Robinett & Kepner; the authors' ``emr_net``).  The first system already makes the
network all-to-all; later layers keep it so (every node has an input).

*RadiX-Net.*  Each EMR layer matrix is Kronecker-multiplied with the all-ones matrix of a
dense "superstructure" with widths ``B_0 .. B_L``: ``mask_i = A_i (x) ones(B_{i+1}, B_i)``,
so layer widths are ``N' * B_i`` and every layer keeps its density ``N_i / N'``; the path
count between any input and output is ``B_1 * ... * B_{L-1}`` times that of the EMR net.

Deviations
----------
* Neuron order: we put the node index outermost (``A (x) ones``, neuron ``j`` of a width
  ``N' B`` layer is node ``j // B``); the authors' code uses ``ones (x) A`` (node ``j mod N'``).
  The two differ by a fixed permutation of each layer's neurons, so the graphs are
  isomorphic; ours makes a node a block of neighbouring neurons (see the adaptation below).
* Direction: the authors' ``np.roll`` connects ``j`` to ``j - k nu_i``; we use ``j + k nu_i``
  as stated above (the mirror image, same properties).

Adaptation to arbitrary widths (:func:`radix_masks_for_widths`)
---------------------------------------------------------------
Reference MLPs such as 784-300-100-10 are not of the form ``N' * B_i``.  We keep the
node system and replace the Kronecker product by an index map: neuron ``j`` of a layer of
width ``w`` sits on node ``floor(j * N' / w)`` and ``mask[o, j] = A[node(o), node(j)]``.
For ``w >= N'`` this is a Kronecker product with ones blocks of sizes ``floor(w/N')`` or
``ceil(w/N')`` (exactly ``A (x) ones`` when ``N'`` divides every width); for ``w < N'``
the layer *samples* ``w`` evenly spread nodes.  ``N'`` is at most the narrowest hidden
width, so hidden layers represent every node and all node paths survive: sampling may only
happen at the input and output layers, which keeps every input connected to every output.
A layer whose side is uniform (equal blocks, or sampled) has exactly the density
``N_i / N'``, because every node of a circulant layer has exactly ``N_i`` inputs and
outputs (e.g. 784-300-100-10 with ``N' = 100`` and radices ((10, 10), (10)) has exactly
10% of every layer).  Uneven blocks on both sides change a layer's density slightly.

Choice of ``N'`` and radices for a target density ``d`` (:func:`choose_radices`): one radix
per layer; the radices must form an EMR partition (each system's running product divides
``N'``; the first system is complete, so the net is all-to-all); among all ``N' <= ``
narrowest hidden width and all such radix sequences we take the one minimizing
``sum_i (log(N_i / N') - log d)^2`` (per-layer relative density error), ties to the larger
``N'``.  Densities are therefore quantized to ``N_i / N'``; a density below what an
all-to-all structure allows at these widths is raised to the nearest achievable one.
Finally every neuron without an input (a row of zeros) or without an output (a column of
zeros), which can only happen next to a sampled input or output layer, gets one random
connection (drawn from ``generator``), as in :func:`nestsynth.seeds.mlp.random_connected_mask`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import NestError
from ..select import top_k


# ---- node-level topologies -------------------------------------------------------
def radix_layer(n_nodes: int, radix: int, place_value: int) -> torch.Tensor:
    """One mixed-radix layer on ``n_nodes`` nodes: node ``j`` feeds ``(j + k * place_value) mod n_nodes``.

    Args:
        n_nodes: ``N'``.
        radix: connections per node (``k = 0 .. radix-1``).
        place_value: the layer's place value ``nu``.

    Returns:
        (n_nodes, n_nodes) float 0/1 matrix, ``A[out, in]``.
    """
    a = torch.zeros(n_nodes, n_nodes)
    src = torch.arange(n_nodes)  # input node j
    for k in range(radix):
        a[(src + k * place_value) % n_nodes, src] = 1.0
    return a


def _check_radix_lists(radix_lists) -> int:
    """Validate an EMR partition and return ``N'`` (product of the first system)."""
    if not radix_lists or any(not rl for rl in radix_lists):
        raise ValueError("radix_lists must be a non-empty list of non-empty radix lists")
    if any(int(r) < 1 for rl in radix_lists for r in rl):
        raise ValueError(f"radices must be >= 1, got {radix_lists}")
    n_nodes = math.prod(radix_lists[0])
    for rl in radix_lists[1:-1]:
        if math.prod(rl) != n_nodes:
            raise ValueError(f"every radix list but the last must multiply to N' = {n_nodes}, got {rl}")
    if n_nodes % math.prod(radix_lists[-1]) != 0:
        raise ValueError(f"the last radix list must multiply to a divisor of N' = {n_nodes}, "
                         f"got {radix_lists[-1]}")
    return n_nodes


def emr_node_masks(radix_lists) -> list[torch.Tensor]:
    """The extended mixed-radix topology: the systems' layers one after the other.

    Args:
        radix_lists: e.g. ``[[10, 10], [10]]``; all but the last multiply to ``N'`` (the
            product of the first), the last to a divisor of ``N'``.

    Returns:
        One (N', N') 0/1 matrix per radix, in layer order.
    """
    n_nodes = _check_radix_lists(radix_lists)
    layers = []
    for rl in radix_lists:
        place_value = 1  # restarts with every system
        for radix in rl:
            layers.append(radix_layer(n_nodes, int(radix), place_value))
            place_value *= int(radix)
    return layers


def mixed_radix_masks(radices: list[int]) -> list[torch.Tensor]:
    """The mixed-radix topology of one numeral system ``radices`` on ``N' = prod(radices)`` nodes.

    Layer ``i`` connects node ``j`` to ``(j + k * prod(radices[:i])) mod N'`` for
    ``k < radices[i]``; the product of the layers is all-ones (one path per node pair).

    Example:
        >>> [int(m.sum()) for m in mixed_radix_masks([2, 2, 2])]  # 2 of 8 per node
        [16, 16, 16]

    Returns:
        One (N', N') float 0/1 matrix per radix.
    """
    return emr_node_masks([list(radices)])


def radix_net_masks(radix_lists, kron_widths) -> list[torch.Tensor]:
    """The RadiX-Net: EMR layers Kronecker-multiplied with dense blocks.

    Args:
        radix_lists: EMR systems (see :func:`emr_node_masks`); ``L`` radices in all.
        kron_widths: ``B_0 .. B_L`` (``L + 1`` positive ints), the dense superstructure.

    Returns:
        ``L`` masks, mask ``i`` = ``A_i (x) ones(B_{i+1}, B_i)`` of shape
        ``(N' B_{i+1}, N' B_i)``; layer widths are ``N' * B_i``.
    """
    nodes = emr_node_masks(radix_lists)
    if len(kron_widths) != len(nodes) + 1 or any(int(b) < 1 for b in kron_widths):
        raise ValueError(f"kron_widths needs {len(nodes) + 1} positive widths, got {list(kron_widths)}")
    return [torch.kron(a, torch.ones(int(kron_widths[i + 1]), int(kron_widths[i])))
            for i, a in enumerate(nodes)]


def path_counts(masks) -> torch.Tensor:
    """Number of paths from every input to every output: ``M_L ... M_1`` (float64).

    Returns:
        (out_width, in_width) tensor.
    """
    p = masks[0].double()
    for m in masks[1:]:
        p = m.double() @ p
    return p


# ---- adaptation to arbitrary widths -------------------------------------------------
def split_radices(radices, n_nodes: int) -> list[list[int]]:
    """Split one radix per layer into EMR systems on ``n_nodes`` nodes.

    A system closes when its running product reaches ``n_nodes``; every running product
    must divide ``n_nodes``, and the first system must close (all-to-all guarantee).

    Example:
        >>> split_radices([10, 10, 10], 100)
        [[10, 10], [10]]

    Raises:
        ValueError: the radices do not form such a partition.
    """
    systems, current, prod = [], [], 1
    for r in radices:
        r = int(r)
        if r < 1 or n_nodes % (prod * r) != 0:
            raise ValueError(f"radices {list(radices)} do not form mixed-radix systems on "
                             f"{n_nodes} nodes (each running product must divide it)")
        current.append(r)
        prod *= r
        if prod == n_nodes:
            systems.append(current)
            current, prod = [], 1
    if current:
        systems.append(current)
    if math.prod(systems[0]) != n_nodes:
        raise ValueError(f"the first radices of {list(radices)} must multiply to {n_nodes} "
                         "(otherwise inputs do not reach every output)")
    return systems


@lru_cache(maxsize=4096)
def _divisors(n: int) -> tuple[int, ...]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return tuple(sorted(set(small + [n // k for k in small])))


def _best_sequence(n_nodes: int, n_layers: int, density: float) -> tuple[float, tuple[int, ...]] | None:
    """Radices minimizing sum (log(r / N') - log d)^2 over EMR partitions whose first system closes."""
    target = math.log(density)

    @lru_cache(maxsize=None)
    def best(i: int, prod: int, closed: bool):
        # (cost, radices for layers i..) with running product `prod` of the open system
        if i == n_layers:
            return (0.0, ()) if closed else None
        out = None
        for r in _divisors(n_nodes // prod):
            nxt = prod * r
            rest = best(i + 1, 1 if nxt == n_nodes else nxt, closed or nxt == n_nodes)
            if rest is None:
                continue
            cost = (math.log(r / n_nodes) - target) ** 2 + rest[0]
            if out is None or cost < out[0] - 1e-12:
                out = (cost, (r,) + rest[1])
        return out

    return best(0, 1, False)


def choose_radices(widths, density: float) -> tuple[int, list[list[int]]]:
    """``N'`` and EMR radix lists for ``widths`` nearest to ``density`` in every layer.

    ``N'`` ranges over 1 .. the narrowest hidden width (1 .. 1 without hidden layers, where
    only the dense layer is all-to-all); see the module docstring for the criterion.

    Example:
        >>> choose_radices([784, 300, 100, 10], 0.1)
        (100, [[10, 10], [10]])

    Returns:
        (N', radix_lists).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    n_layers = len(widths) - 1
    hidden = [int(w) for w in widths[1:-1]]
    best_key, best = None, None
    for n_nodes in range(1, (min(hidden) if hidden else 1) + 1):
        found = _best_sequence(n_nodes, n_layers, density)
        if found is None:
            continue
        key = (round(found[0], 9), -n_nodes)
        if best_key is None or key < best_key:
            best_key, best = key, (n_nodes, found[1])
    n_nodes, radices = best
    return n_nodes, split_radices(radices, n_nodes)


def node_of(width: int, n_nodes: int) -> torch.Tensor:
    """Node of every neuron of a layer: ``floor(j * N' / width)``, shape (width,)."""
    return torch.div(torch.arange(width) * n_nodes, width, rounding_mode="floor")


def connect_every_neuron(masks, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Copies of ``masks`` where every neuron has an input and an output.

    An empty row (a unit without input) gets one connection from a random input, then an
    empty column (a neuron without output) one to a random unit of the next layer.

    Returns:
        New (out, in) masks; unchanged where nothing was missing.
    """
    out = []
    for m in masks:
        m = m.clone()
        rows = torch.nonzero(m.sum(1) == 0).flatten()
        m[rows, torch.randint(m.shape[1], (len(rows),), generator=generator)] = 1.0
        cols = torch.nonzero(m.sum(0) == 0).flatten()
        m[torch.randint(m.shape[0], (len(cols),), generator=generator), cols] = 1.0
        out.append(m)
    return out


def radix_masks_for_widths(widths, density: float | None = None, radices=None, nodes: int = 0,
                           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """RadiX-Net masks for an MLP of arbitrary ``widths`` (see "Adaptation" in the module doc).

    Args:
        widths: (in, hidden..., out).
        density: target density of every layer; used when ``radices`` is not given.
        radices: one radix per layer (``len(widths) - 1`` ints), or EMR radix lists
            (list of lists); overrides ``density``.
        nodes: ``N'`` for ``radices`` given as flat ints (0: their product, one system).
        generator: randomness of the connectivity repair only (the topology is deterministic).

    Returns:
        ``len(widths) - 1`` float masks (w_{i+1}, w_i); every input reaches every output and
        every neuron has an input and an output.

    Raises:
        NestError: invalid radices, or ``N'`` wider than a hidden layer.
    """
    widths = [int(w) for w in widths]
    n_layers = len(widths) - 1
    if radices is None or len(radices) == 0:
        if density is None:
            raise NestError("radix masks need a density or radices.")
        n_nodes, radix_lists = choose_radices(widths, density)
    else:
        try:
            if all(isinstance(r, (list, tuple)) for r in radices):
                radix_lists = [list(map(int, rl)) for rl in radices]
                n_nodes = _check_radix_lists(radix_lists)
            else:
                n_nodes = int(nodes) or math.prod(int(r) for r in radices)
                radix_lists = split_radices(radices, n_nodes)
        except ValueError as exc:
            raise NestError(f"invalid RadiX-Net radices: {exc}.") from None
    flat = [r for rl in radix_lists for r in rl]
    if len(flat) != n_layers:
        raise NestError(f"RadiX-Net radices {flat} give {len(flat)} layers; the network has {n_layers}.")
    if widths[1:-1] and n_nodes > min(widths[1:-1]):
        raise NestError(f"RadiX-Net with N' = {n_nodes} nodes needs hidden widths >= {n_nodes}; "
                        f"got {widths[1:-1]}.")
    masks = [a[node_of(widths[i + 1], n_nodes)][:, node_of(widths[i], n_nodes)]
             for i, a in enumerate(emr_node_masks(radix_lists))]  # (w_{i+1}, w_i)
    return connect_every_neuron(masks, generator)


def radix_seed_masks(widths, density: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """RadiX-Net masks to use as a NeST seed topology (every neuron connected).

    Args:
        widths: the seed's widths, e.g. ``seed_widths(reference, ratio)``.
        density: target density of every layer (quantized, see :func:`choose_radices`).
        generator: randomness of the connectivity repair (rarely needed).

    Returns:
        One float (out, in) mask per layer.
    """
    return radix_masks_for_widths(widths, density=density, generator=generator)


# ---- the random control -------------------------------------------------------------
def random_cover_mask(out_f: int, in_f: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``count`` random ones with every row and every column non-empty.

    A random cover of ``max(out_f, in_f)`` ones (random row and column permutations
    paired cyclically) plus ``count - max(out_f, in_f)`` uniformly random further ones.

    Raises:
        ValueError: ``count`` is below ``max(out_f, in_f)`` or above ``out_f * in_f``.
    """
    cover = max(out_f, in_f)
    if not cover <= count <= out_f * in_f:
        raise ValueError(f"{count} connections cannot cover a {out_f}x{in_f} layer")
    mask = torch.zeros(out_f, in_f)
    k = torch.arange(cover)
    rows, cols = torch.randperm(out_f, generator=generator), torch.randperm(in_f, generator=generator)
    mask[rows[k % out_f], cols[k % in_f]] = 1.0  # distinct positions: the longer side is a permutation
    extra = count - cover
    if extra > 0:
        scores = torch.rand(out_f, in_f, generator=generator).masked_fill_(mask.bool(), -1.0)
        mask.view(-1)[top_k(scores, extra)] = 1.0
    return mask


def random_equivalent(masks, generator: torch.Generator) -> list[torch.Tensor]:
    """Random masks with exactly the per-layer connection counts of ``masks``.

    Every neuron (inputs included) gets at least one input and one output, like the
    RadiX masks it is compared with (:func:`random_cover_mask`).

    Returns:
        One float (out, in) mask per layer.
    """
    return [random_cover_mask(m.shape[0], m.shape[1], int(m.sum()), generator) for m in masks]
