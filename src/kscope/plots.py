"""Figures: matplotlib on the file-only Agg backend, saved atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
        fig.savefig(tmp, dpi=dpi)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        pyplot().close(fig)
    return path
