"""What the trainer prints for people: evaluation tables, durations, the end-of-run summary."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

# Row keys that describe the row rather than measure the model.
ROW_KEYS = ("epoch", "dataset", "split")
COUNT_KEYS = ("questions", "triples")


def metric_keys(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The measured keys of evaluation rows, in the order they first appear."""
    keys: Dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ROW_KEYS and key not in COUNT_KEYS and isinstance(value, (int, float)):
                keys.setdefault(key, None)
    return list(keys)


def format_value(value: Any) -> str:
    """Rates with 4 decimals, ranks (MR) and counts with fewer: short enough for a table."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table, one line per row: dataset, split, the count of evaluated items (when
    the rows have one) and every metric."""
    if not rows:
        return "(no evaluation rows)"
    counts = [key for key in COUNT_KEYS if any(key in row for row in rows)]
    columns = ["dataset", "split", *counts, *metric_keys(rows)]
    cells = [[format_value(row.get(key, "")) for key in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    # Names left-aligned, numbers right-aligned.
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(values) for values in cells)])


def format_duration(seconds: Optional[float]) -> str:
    """1h02m, 3m05s, 42s; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def summary(history: Sequence[Dict[str, Any]], best_epoch: Optional[int], metric: Optional[str],
            metric_split: Optional[str], best_score: float, saved: Sequence[str]) -> str:
    """The end-of-run report: the best epoch, its evaluation rows (every split), where it went."""
    lines = []
    if best_epoch is None:
        lines.append(f"no epoch was scored on {metric}: the model of the last epoch is kept")
    elif not math.isfinite(best_score):
        lines.append(f"epoch {best_epoch} of {len(history)}, the last, is kept: no epoch was evaluated on {metric}")
    else:
        on = f"mean {metric_split} {metric}" if metric_split else f"mean {metric}"
        score = format_value(best_score) if math.isfinite(best_score) else "not evaluated"
        lines.append(f"best epoch {best_epoch} of {len(history)} ({on} = {score})")
        rows = next((h.get("rows") for h in history if h.get("epoch") == best_epoch), None)
        if rows:
            lines.append(format_table(rows))
    lines += [f"saved: {path}" for path in saved]
    return "\n".join(lines)
