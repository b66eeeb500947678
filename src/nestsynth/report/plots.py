"""Plots of a run: connections vs iteration (paper Fig. 8), grown input density (Fig. 3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import checkpoint as ckpt  # noqa: E402
from .run_files import load_run_model, read_history  # noqa: E402

PHASE_COLOURS = {"seed": "tab:gray", "dense": "tab:gray", "growth": "tab:green",
                 "pruning": "tab:red", "finetune": "tab:blue"}


def plot_connections(history: list[dict], path: Path) -> None:
    """Active connections after every synthesis iteration, coloured by phase."""
    rows = [r for r in history if r["phase"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(len(rows)))
    ax.plot(xs, [r["weights"] for r in rows], color="black", lw=1)
    phases = list(dict.fromkeys(r["phase"] for r in rows))  # baselines log their own phase names
    others = iter(c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c not in PHASE_COLOURS.values())
    for phase in phases:
        colour = PHASE_COLOURS.get(phase) or next(others, "tab:olive")
        pts = [(x, r["weights"]) for x, r in zip(xs, rows) if r["phase"] == phase and r.get("accepted", True)]
        if pts:
            ax.scatter(*zip(*pts), s=10, color=colour, label=phase, zorder=3)
    rejected = [(x, r["weights"]) for x, r in zip(xs, rows) if r.get("accepted") is False]
    if rejected:
        ax.scatter(*zip(*rejected), s=30, marker="x", color="black", label="rejected (rest)", zorder=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("active connections")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grown_input_density(seed_mask: torch.Tensor, grown_mask: torch.Tensor) -> torch.Tensor:
    """Share of first-layer neurons that grew a connection to each input.

    Args:
        seed_mask: (H_seed, D) first-layer mask of the seed.
        grown_mask: (H_post, D) first-layer mask after growth; the seed's neurons are
            its first H_seed rows (growth only appends neurons).

    Returns:
        (D,) density of grown connections per input.
    """
    grown = grown_mask.clone()
    grown[: seed_mask.shape[0]] -= seed_mask
    return grown.clamp(min=0).sum(0) / grown_mask.shape[0]


def plot_input_growth(density: torch.Tensor, image_shape, path: Path) -> None:
    """Heat map of :func:`grown_input_density` over the input image."""
    h, w = image_shape[-2], image_shape[-1]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    im = ax.imshow(density.reshape(-1, h, w).mean(0).numpy(), cmap="viridis")
    fig.colorbar(im, ax=ax, label="grown connection density")
    ax.set_title("connections grown from the input")
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def redraw_plots(run: Path) -> list[Path]:
    """(Re)draw every plot of a run directory from its files; returns the paths written."""
    out = ckpt.plots_dir(run)
    written = []
    history = read_history(run)
    if history:
        plot_connections(history, out / "connections.png")
        written.append(out / "connections.png")
    final = load_run_model(run, "final")
    if final is not None and hasattr(final, "n_conv"):  # CNN: the first conv layer's area of interest (Fig. 5)
        from .area_plot import plot_area_of_interest
        plot_area_of_interest(final.layers[0].area, out / "area_of_interest.png",
                              "area of interest of the first-layer kernels")
        written.append(out / "area_of_interest.png")
        return written
    image_shape = _image_shape(run)
    seed, post = load_run_model(run, "seed"), load_run_model(run, "post_growth")
    if image_shape is not None and seed is not None and post is not None:
        density = grown_input_density(seed.layers[0].mask, post.layers[0].mask)
        if density.numel() == math.prod(image_shape):
            plot_input_growth(density, image_shape, out / "input_growth.png")
            written.append(out / "input_growth.png")
    return written


def _image_shape(run: Path):
    path = ckpt.report_path(run)
    if not path.is_file():
        return None
    shape = json.loads(path.read_text()).get("input_shape")
    return tuple(shape) if shape and len(shape) == 3 else None
