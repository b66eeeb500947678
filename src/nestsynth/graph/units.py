"""Where one unit of a coupled group lives in a :class:`~nestsynth.graph.SparseGraph`, and
installing a new unit's weights there.

Unit ``c`` of a group (:meth:`nestsynth.graph.NetGraph.groups`) is output row ``c`` of every
*member* and the input columns ``Slice.indices([c])`` of every *read* (a consumer layer and
one input slice of it that the group feeds; a consumer that reads the group twice, e.g.
``cat([x, x])``, has two reads).  Growth (Policy 2/3 on groups) and unit removal work on
these rows and column blocks; :func:`install_units` writes the weights of units that
:func:`nestsynth.graph.add_units` has just appended and switches their connections on
exactly where the weights are non-zero, as :func:`nestsynth.sparse.append_units` does for
a chain.
"""

from __future__ import annotations

import torch

from ..sparse.surgery import set_mask, warm_second_moment
from .ir import Group, Slice


def member_indices(model, group: Group) -> list[int]:
    """Indices (in ``model.layers``) of the group's members."""
    names = model.layer_names
    return [names.index(m) for m in group.members]


def group_reads(model, group: Group) -> list[tuple[int, Slice]]:
    """(consumer layer index, input slice) for every read of the group's units."""
    names = model.layer_names
    return [(names.index(s.reader), s) for s in group.reads]


def current(model, group: Group) -> Group:
    """The group as it is now (found again by its first member, after surgery elsewhere)."""
    return model.graph.group_of(group.members[0])


def column_block(layer, s: Slice, units: torch.Tensor) -> torch.Tensor:
    """The weight entries of ``layer`` that read ``units`` through slice ``s``:
    ``weight[:, s.indices(units)]`` (out, n * expansion) or (out, n, kh, kw)."""
    return layer.weight.detach().index_select(1, s.indices(units).to(layer.weight.device))


def reads_unit(model, group: Group) -> torch.Tensor:
    """(units,) bool: some consumer has a live connection from the unit."""
    out = torch.zeros(group.units, dtype=torch.bool)
    for i, s in group_reads(model, group):
        mask = model.layers[i].mask.index_select(1, s.indices().to(model.layers[i].mask.device))
        out |= mask.transpose(0, 1).reshape(group.units, -1).bool().any(1).cpu()
    return out


def fed_in(layer) -> torch.Tensor:
    """(out,) bool: the layer's output unit has a live incoming connection (and, for a
    convolution, a computed output position), i.e. its output depends on the data."""
    live = layer.mask.flatten(1).bool().any(1)
    area = getattr(layer, "area", None)
    return (live & area.flatten(1).bool().any(1) if area is not None else live).cpu()


@torch.no_grad()
def install_units(model, group: Group, units: torch.Tensor, rows: dict[int, torch.Tensor],
                  cols: dict[int, torch.Tensor], optimizer=None, warm: bool = False) -> None:
    """Write the weights of ``units`` (new units of the group) and set their masks.

    Args:
        model: a SparseGraph.
        group: the group (present state).
        units: int64 indices of the units being written.
        rows: member position in ``group.members`` -> (n, *weight.shape[1:]) incoming weights.
        cols: read position in ``group.reads`` -> the column block (as :func:`column_block`).
        optimizer: its state of the new entries stays zero (or warm, below).
        warm: the new non-zero weights (and the units' biases) start with the layer's mean
            Adam second moment (:func:`nestsynth.sparse.surgery.warm_second_moment`).

    The connections of the units are switched on exactly where the written weights are
    non-zero (dormant elsewhere); members and reads not given keep their weights and masks.
    """
    members = member_indices(model, group)
    reads = group_reads(model, group)
    touched: dict[int, list] = {}
    for j, w in rows.items():
        i = members[j]
        rows_idx = units.to(model.layers[i].weight.device)
        touched.setdefault(i, []).append((0, rows_idx, w))
    for k, w in cols.items():
        i, s = reads[k]
        idx = s.indices(units).to(model.layers[i].weight.device)
        touched.setdefault(i, []).append((1, idx, w))
    for i, edits in touched.items():
        layer = model.layers[i]
        new_mask = layer.mask.clone()
        for dim, idx, w in edits:
            w = w.to(layer.weight.dtype).to(layer.weight.device)
            layer.weight.index_copy_(dim, idx, w)
            layer.mask.index_fill_(dim, idx, 0.0)  # so every non-zero new weight counts as grown
            new_mask.index_copy_(dim, idx, (w != 0).to(new_mask.dtype))
            if dim == 0 and warm:
                new_rows = torch.zeros_like(layer.bias, dtype=torch.bool)
                new_rows[idx] = True
                warm_second_moment(layer.bias, optimizer, new_rows)
        set_mask(layer, new_mask, optimizer, warm)
