"""matplotlib without a display, and figures saved atomically."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_file


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically and close it."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return Path(path)
