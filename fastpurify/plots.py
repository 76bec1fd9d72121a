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
    _acc_asr_lines(ax, xs, acc, asr)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(plt, fig, path)


def selection_curve(selection, path: str | Path, *, title: str = "ANP: the trigger-free pruning choice") -> Path:
    """The ``auto`` rule's curve: clean accuracy, the adversary's error rate and the share of its
    errors on one class (in %) against the neurons pruned; the chosen number and the bound marked."""
    plt, fig, ax = _figure()
    xs = [p.pruned for p in selection.points]
    ax.plot(xs, [100 * p.acc for p in selection.points], marker="o", color="#228833", label="clean ACC")
    patch = selection.settings.get("walk") == "patch"
    ax.plot(xs, [100 * p.adv_error for p in selection.points], marker=".", color="#bbbbbb",
            label="clean images the adversary flips" + (" (of the other classes)" if patch else ""))
    if selection.target is not None:
        label = (f"share of the other images the trigger reconstructed toward class {selection.target} sends there"
                 if patch else f"share of those on the suspected target (class {selection.target})")
        ax.plot(xs, [100 * (p.target_share or 0.0) for p in selection.points], marker="s", color="#aa3377",
                label=label)
    ax.axhline(100 * selection.settings["max_target_share"], color="#aa3377", linestyle=":", linewidth=1)
    ax.axvline(selection.pruned, color="#cc3311", linestyle="--", label=f"chosen: {selection.pruned} pruned")
    ax.set_xlabel("neurons pruned (smallest scores first)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    ax.set_title(title)
    return _save(plt, fig, path)


def _acc_asr_lines(ax, xs: Sequence[float], acc: Sequence[float], asr: Sequence[float | None]) -> None:
    """ACC and, where known, ASR in % against ``xs`` on a 0-100 axis with a grid and legend."""
    ax.plot(xs, [100 * a for a in acc], marker="o", color="#228833", label="ACC (clean accuracy)")
    if any(a is not None for a in asr):
        ax.plot(xs, [None if a is None else 100 * a for a in asr], marker="s", color="#cc3311",
                label="ASR (attack success rate)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def _round_label(r) -> str:
    return f"{r.round + 1}\n{r.fraction:.0%}" if r.fraction is not None else f"{r.round + 1}\nclean set"


def pbe_rounds(report, path: str | Path, *, title: str = "PBE: ACC and ASR per round") -> Path:
    """ACC and ASR (in %) of a :class:`~fastpurify.purification.PBEReport` per round, round 0
    being the infected model before PBE (as the PBE paper's fig. 6); where a round has both
    steps, its point after the adversarial epochs (step 1b) sits half-way, hollow. With the
    ground truth, each extra set's poisoned share and the ranking's AP (x 100), dashed. Needs
    the report's test metrics (``test_data``)."""
    if report.before is None or any(r.acc is None for r in report.rounds):
        raise ValueError("the report holds no test metrics: run PBE with test_data to plot ACC / ASR per round")
    plt, fig, ax = _figure()
    xs, acc, asr = [0.0], [report.before["acc"]], [report.before.get("asr")]
    middle = []
    for r in report.rounds:
        if r.adv_acc is not None:
            middle.append((r.round + 0.5, r.adv_acc, r.adv_asr))
            xs.append(r.round + 0.5), acc.append(r.adv_acc), asr.append(r.adv_asr)
        xs.append(r.round + 1.0), acc.append(r.acc), asr.append(r.asr)
    _acc_asr_lines(ax, xs, acc, asr)
    for x, a, b in middle:
        ax.plot([x], [100 * a], marker="o", color="white", markeredgecolor="#228833", zorder=3)
        if b is not None:
            ax.plot([x], [100 * b], marker="s", color="white", markeredgecolor="#cc3311", zorder=3)
    if any(r.poisoned_fraction is not None for r in report.rounds):
        rx = [r.round + 1 for r in report.rounds]
        ax.plot(rx, [None if r.poisoned_fraction is None else 100 * r.poisoned_fraction for r in report.rounds],
                linestyle="--", marker="x", color="#aa3377", label="extra set's poisoned share")
        ax.plot(rx, [None if r.average_precision is None else 100 * r.average_precision for r in report.rounds],
                linestyle="--", marker="^", color="#4477aa", label="ranking's AP x 100")
        ax.legend(loc="best")
    ticks = list(range(len(report.rounds) + 1))
    ax.set_xticks(ticks, ["0\nbefore", *(_round_label(r) for r in report.rounds)])
    ax.set_xlabel("round (extra set)" + ("; hollow: after the round's adversarial epochs" if middle else ""))
    ax.set_title(title)
    return _save(plt, fig, path)


def precision_recall(report, path: str | Path, *,
                     title: str = "PBE: finding the clean training images") -> Path:
    """Precision against recall of taking the top of each round's clean-first ranking as the
    clean images (as the PBE paper's fig. 7), one curve per round, with the clean share (a
    random ranking's precision) dashed. Needs the progressive setting and the ground truth
    (``report.poisoned``)."""
    from .ranking import precision_recall_curve

    ranked = [r for r in report.rounds if r.ranking is not None]
    if report.poisoned is None or not ranked:
        raise ValueError("a precision-recall curve needs the rankings of the progressive setting and the ground "
                         "truth (poison_indices)")
    clean = ~report.poisoned.cpu()
    plt, fig, ax = _figure()
    colors = plt.cm.viridis([i / max(1, len(ranked) - 1) * 0.85 for i in range(len(ranked))])
    share = float(clean.double().mean())
    lowest = share
    for r, color in zip(ranked, colors):
        precision, recall = precision_recall_curve(r.ranking.cpu(), clean)
        lowest = min(lowest, float(precision.min()))
        ap = f": AP {r.average_precision:.3f}" if r.average_precision is not None else ""
        ax.plot(recall.numpy(), 100 * precision.numpy(), color=color,
                label=f"round {r.round + 1} ({r.fraction:.0%} extra set){ap}")
    ax.axhline(100 * share, color="#777777", linestyle="--", label=f"clean share {share:.1%} (random ranking)")
    ax.set_xlabel("recall of the clean images")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(100 * lowest - 2, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    return _save(plt, fig, path)


def reproduction_bars(rows: list[dict], methods: Sequence[str], path: str | Path, *, title: str) -> Path:
    """ACC and ASR per attack (a reproduction table's rows): one bar per method (``"<method> ACC"``
    and ``"<method> ASR"`` cells in percent), the std over seeds as error bars."""
    plt, fig, axes = _figure(width=8.0, height=3.4)
    fig.clf()
    width = 0.8 / len(methods)
    for k, metric in enumerate(("ACC", "ASR")):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, name in enumerate(methods):
            cells = [row["cells"].get(f"{name} {metric}") for row in rows]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [c["mean"] if c else 0.0 for c in cells], width,
                   yerr=[c["std"] if c else 0.0 for c in cells], label=name, capsize=2)
        ax.set_xticks(range(len(rows)), [r["attack"] for r in rows])
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{metric} (%)")
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)
