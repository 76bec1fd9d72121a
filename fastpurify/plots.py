"""PNG figures of the command line reports (matplotlib, drawn off-screen, written atomically).
Without matplotlib the figures are skipped and the caller is told why."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .files import atomic_path


def matplotlib_missing() -> str | None:
    """None when figures can be drawn, else the reason they cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def _figure(width: float = 5.5, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=120)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def mask_distribution(masks: dict[str, torch.Tensor], path: str | Path, *, threshold: float | None = None,
                      title: str = "ANP mask values") -> Path:
    """Histogram of every neuron's mask (log counts), with the pruning threshold marked."""
    plt, fig, ax = _figure()
    values = torch.cat([m.detach().double().cpu().reshape(-1) for m in masks.values()]).numpy()
    ax.hist(values, bins=40, range=(0.0, 1.0), color="#4477aa", edgecolor="white", log=True)
    if threshold is not None:
        pruned = int((values <= threshold).sum())
        ax.axvline(threshold, color="#cc3311", linestyle="--", label=f"threshold {threshold:g}: {pruned} pruned")
        ax.legend(loc="upper left")
    ax.set_xlabel("mask value")
    ax.set_ylabel("neurons (log scale)")
    ax.set_title(f"{title} ({values.size} neurons)")
    return _save(plt, fig, path)


def pruning_curve(xs: Sequence[float], acc: Sequence[float], asr: Sequence[float | None], path: str | Path, *,
                  xlabel: str = "pruning threshold", title: str = "ACC and ASR after pruning") -> Path:
    """Clean accuracy and attack success rate (in %) against the pruning threshold or count."""
    plt, fig, ax = _figure()
    ax.plot(xs, [100 * a for a in acc], marker="o", color="#228833", label="ACC (clean accuracy)")
    if any(a is not None for a in asr):
        ax.plot(xs, [None if a is None else 100 * a for a in asr], marker="s", color="#cc3311",
                label="ASR (attack success rate)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title)
    return _save(plt, fig, path)
