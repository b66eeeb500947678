"""Fig. 5 of the paper: the area-of-interest of each kernel of a conv layer (usually the
first), drawn from its partial-area mask (white = computed, black = pruned)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_area_of_interest(area: torch.Tensor, path: Path, title: str = "area of interest",
                          max_cols: int = 8) -> Path:
    """Grid of one small image per kernel: its (H, W) area mask.

    Args:
        area: (out, H, W) 0/1 area mask (e.g. ``model.layers[0].area``).
        path: PNG file to write (parent folders are created).
        title: figure title.
        max_cols: kernels per row.

    Returns:
        ``path``.
    """
    area = area.detach().float().cpu()  # (out, H, W)
    n = area.shape[0]
    cols = max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(area[k].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"k{k} {100 * float(area[k].mean()):.0f}%", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
