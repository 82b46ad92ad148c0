"""Figures: matplotlib on the file-only Agg backend, saved atomically; one colour per unit kind (``UNIT_COLORS``) and
legends outside the axes (``legend_outside``), shared by every figure of the report, the README and the explorer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


UNIT_COLORS = {"neuron": "#e6550d", "feature": "#3182bd", "basis": "#756bb1", "pca": "#31a354", "random": "#969696"}
"""The one colour of each unit kind (MLP neurons, SAE features, the same-site basis, PCA and random directions), in every
figure and page."""

SITE_MARKERS = {"mlp.out": "o", "resid.post": "s", "mlp.neurons": "o"}
"""Where one kind sits at several sites (features at ``mlp.out`` and ``resid.post``), the marker tells the sites apart."""


def unit_color(kind: str) -> str:
    """The colour of a unit kind (also of a handle or label that names one: "keyed-features", "top neurons")."""
    if kind in UNIT_COLORS:
        return UNIT_COLORS[kind]
    for k in ("feature", "neuron", "pca", "basis", "random"):
        if k in kind:
            return UNIT_COLORS[k]
    return "#555555"


def legend_outside(ax, handles=None, labels=None, fontsize: float = 7, **kw):
    """A legend to the right of the axes ``ax``, never over the data; ``save_figure`` keeps it in the image
    (``bbox_inches="tight"``). Entries with the same label appear once."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        labels, handles = list(seen), list(seen.values())
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=fontsize,
                     frameon=False, **kw)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG via a temp file beside ``path`` (never half-written), then close it."""
    from kscope.io import honour_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")  # legends outside the axes stay in
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        pyplot().close(fig)
    return path
