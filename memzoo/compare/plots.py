"""The leaderboard plot: the headline metric against evaluation length, one line per
variant (mean over seeds, bars = min..max over seeds), the training length marked.

matplotlib is optional (the ``plot`` / ``dev`` extras); without it the plot is
skipped with a message and every other file is still written.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from pathlib import Path

from memzoo.compare.results import Leaderboard, write_atomic

MISSING = "matplotlib is not installed (pip install 'memzoo[plot]'); skipped the PNG plot"


def plot_headline(board: Leaderboard, path: Path) -> Path | str:
    """Write the PNG to ``path`` and return it, or return why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MISSING
    rows = [r for r in board.rows if r.slice == "all"]
    if not rows and board.runs and all(r.status == "diverged" for r in board.runs):
        return _diverged_only(board, path, plt)
    if not rows:
        return "no rows to plot"
    metric = board.rows[0].metric
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.metric == metric:
            series[r.variant][r.eval_length].append(r.value)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant in sorted(series):
        lengths = sorted(series[variant])
        means = [statistics.fmean(series[variant][n]) for n in lengths]
        lo = [m - min(series[variant][n]) for m, n in zip(means, lengths)]
        hi = [max(series[variant][n]) - m for m, n in zip(means, lengths)]
        gone = sorted(r.seed for r in board.runs if r.variant == variant and r.status == "diverged")
        label = variant + (f" (seed {', '.join(map(str, gone))} diverged)" if gone else "")
        ax.errorbar(lengths, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
    for variant in sorted({r.variant for r in board.runs if r.status == "diverged"} - set(series)):
        ax.plot([], [], linestyle="none", marker="x", color="red", label=f"{variant}: diverged (no scores)")
    ax.axvline(rows[0].train_length, color="grey", linestyle=":", label="train length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(metric)
    seeds = len({r.seed for r in rows})
    ax.set_title(f"{board.task}: {metric} vs length ({seeds} seed{'s' if seeds != 1 else ''})")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Write the figure as a PNG, atomically, and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _diverged_only(board: Leaderboard, path: Path, plt) -> Path:  # type: ignore[no-untyped-def]
    """The plot when every run diverged: no axes to read numbers from, just which runs and when."""
    from memzoo.compare.leaderboard import describe_divergence

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.axis("off")
    lines = [describe_divergence(r) for r in board.runs]
    ax.text(0.02, 0.98, f"{board.task}: every run diverged (no scores)\n\n" + "\n".join(lines), va="top", ha="left",
            fontsize="small", wrap=True, transform=ax.transAxes)
    return _save(fig, plt, path)


def plot_losses(board: Leaderboard, path: Path) -> Path | str:
    """The training loss curves (one line per run, one colour per variant) beside the
    accuracy plot; a diverged run's curve stops where it diverged. Returns the path, or
    why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MISSING
    runs = [r for r in board.runs if any(x is not None for x in r.losses)]
    if not runs:
        return "no loss curves to plot"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: (r.variant, r.seed)):
        points = [(i * run.log_every, x) for i, x in enumerate(run.losses) if x is not None and x > 0]
        label = run.variant if run.variant not in colours else None
        line = ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, alpha=0.8,
                       color=colours.get(run.variant), label=label)[0]
        colours.setdefault(run.variant, line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats per scored token)")
    ax.set_yscale("log")
    ax.set_title(f"{board.task}: training loss ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)
