"""training_curves.png: the loss of every step and every evaluated metric of every epoch."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..atomic_io import atomic_write
from .report import metric_keys

SPLIT_STYLES = {"valid": "-", "test": "--", "train": ":"}
STYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted"}


def is_rank_metric(name: str) -> bool:
    """Mean rank (lower is better, unbounded): drawn apart from the rates in [0, 1]."""
    return name == "mr" or name.endswith("_mr")


def metric_groups(names: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """(panel title, metrics) groups: entity metrics, document metrics, other rates, mean ranks."""
    titles = {"ent": "entities", "doc": "documents"}
    groups: Dict[str, List[str]] = {}
    for name in names:
        prefix = name.split("_", 1)[0] if "_" in name else ""
        title = titles.get(prefix, "evaluation")
        if is_rank_metric(name):
            title = f"{title}: mean rank" if title != "evaluation" else "mean rank"
        groups.setdefault(title, []).append(name)
    return list(groups.items())


def split_means(history: Sequence[Dict[str, Any]], name: str, split: str) -> List[Tuple[int, float]]:
    """(epoch, mean of ``name`` over the datasets' rows of ``split``) for every epoch that has them."""
    points = []
    for entry in history:
        values = [row[name] for row in entry.get("rows") or []
                  if row.get("split") == split and isinstance(row.get(name), (int, float))]
        if values:
            points.append((int(entry["epoch"]), float(sum(values) / len(values))))
    return points


def plot_curves(path: str, history: Sequence[Dict[str, Any]], title: str, metric: Optional[str] = None,
                metric_split: Optional[str] = None, best_epoch: Optional[int] = None) -> bool:
    """Writes the figure to ``path`` (atomically); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # plotting is optional
        return False
    rows = [row for entry in history for row in entry.get("rows") or []]
    groups = metric_groups(metric_keys(rows))
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.2 * (1 + len(groups)), 3.6), squeeze=False)
    axes = axes[0]
    _plot_loss(axes[0], history)
    epochs = [int(entry["epoch"]) for entry in history]
    splits = [split for split in ("valid", "test", "train") if any(row.get("split") == split for row in rows)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (group, names) in zip(axes[1:], groups):
        for k, name in enumerate(names):
            for split in splits:
                points = split_means(history, name, split)
                if points:
                    label = name if split == splits[0] else None
                    ax.plot(*zip(*points), SPLIT_STYLES[split], marker="o", markersize=3, color=colors[k % len(colors)],
                            label=label)
        if metric in names and best_epoch is not None:
            best = [value for epoch, value in split_means(history, metric, metric_split if metric_split in splits else splits[0])
                    if epoch == best_epoch] if splits else []
            if best:
                ax.plot([best_epoch], best, marker="*", markersize=13, color="gold", markeredgecolor="black",
                        linestyle="none", label=f"best ({metric})", zorder=5)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
        styles = ", ".join(f"{STYLE_NAMES[SPLIT_STYLES[s]]} {s}" for s in splits)
        ax.set(xlabel="epoch", title=f"{group} ({styles})")
        if 0 < len(set(epochs)) <= 12:
            ax.set_xticks(sorted(set(epochs)))  # whole epochs only (MaxNLocator gives 0.1 steps for one epoch)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            # One epoch is one point: keep it in the middle of a readable axis.
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if not all(is_rank_metric(name) for name in names):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return True


def _plot_loss(ax, history: Sequence[Dict[str, Any]]) -> None:
    """The loss of every step over the run's steps, the epoch means at each epoch's end."""
    done, ends = 0, []
    for entry in history:
        steps = entry.get("step_loss") or []
        if steps:
            ax.plot(range(done + 1, done + len(steps) + 1), steps, color="tab:blue", alpha=0.45, linewidth=0.8,
                    label="step" if done == 0 else None)
        done += max(len(steps), 1)
        ends.append((done, entry["loss"]))
        ax.axvline(done, color="grey", linestyle=":", linewidth=0.6)
    if ends:
        ax.plot(*zip(*ends), "o-", color="tab:red", markersize=4, label="epoch mean")
    ax.set(xlabel="training step (dotted: epoch ends)", ylabel="training loss", title="loss")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
