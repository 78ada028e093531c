"""Figures every step writes: matplotlib with the Agg canvas, no pyplot state, no LaTeX."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xpr.io.atomic import atomic_path


def figure(nrows: int = 1, ncols: int = 1, size=(5.0, 4.0), **kwargs):
    """A new (figure, axes) pair independent of pyplot's global state."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, axes


def save(fig, path, dpi: int = 100) -> Path:
    """Write a PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def image(ax, array, title: str = "", cmap: str = "viridis", colorbar: bool = True, **kwargs):
    """Show a 2-D array with its colour bar and title."""
    im = ax.imshow(array, cmap=cmap, origin="lower", **kwargs)
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return im
