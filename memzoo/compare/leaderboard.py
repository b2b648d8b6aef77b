"""Leaderboard files from result rows: ``<task>.json`` (the rows, validated by
:class:`~memzoo.compare.results.Leaderboard` on load), ``<task>.md`` (mean ± standard
deviation over seeds) and ``<task>.png`` (headline metric vs length per variant;
needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from memzoo.compare.results import Leaderboard, ResultRow, RunRecord, RunSummary, dump, write_atomic
from memzoo.compare.settings import CompareConfig


def cell(values: list[float], digits: int = 3) -> str:
    """'mean ± std' over seeds (sample std); just the mean for one seed."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _by(rows: Iterable[ResultRow], metric: str, slice_: str) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.metric == metric and r.slice == slice_:
            out[(r.variant, r.eval_length)].append(r.value)
    return out


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def diverged_runs(runs: Iterable[RunSummary]) -> list[RunSummary]:
    """The runs without numbers: diverged (a result) or failed (kept failing; never cached)."""
    return [r for r in runs if r.status != "finished"]


def describe_divergence(run: RunSummary) -> str:
    """``bswa seed 0 diverged at step 3 (loss 3.4e+06 exceeds 28.9; last finite loss 2.81)``,
    or ``full seed 0 FAILED (RuntimeError: ...)``."""
    if run.status == "failed":
        first = (run.error or "no message").splitlines()[0][:200]
        return f"{run.variant} seed {run.seed} FAILED ({first})"
    d = run.divergence
    if d is None:
        return f"{run.variant} seed {run.seed} diverged"
    last = "none" if d.last_finite_loss is None else f"{d.last_finite_loss:.4g}"
    return f"{run.variant} seed {run.seed} diverged at step {d.step} ({d.reason}; last finite loss {last})"


def divergence_notes(runs: Iterable[RunSummary]) -> str:
    """Markdown lines for the runs that diverged (they have no scores), or ''."""
    bad = diverged_runs(runs)
    if not bad:
        return ""
    title = "**Diverged or failed runs**" if any(r.status == "failed" for r in bad) else "**Diverged runs**"
    return "\n".join([f"{title} (no scores; in no mean or plot):", *(f"- `{describe_divergence(r)}`" for r in bad)]) + "\n"


def markdown_table(
    rows: list[ResultRow], metric: str | None = None, runs: Iterable[RunSummary] = (), *, list_runs: bool = True
) -> str:
    """The headline table: one line per variant, one column per eval length, plus
    parameters, state size at the longest length, training throughput and wall time.
    A variant whose every run diverged gets a line saying so instead of numbers; a
    variant with some diverged seeds is marked ``†`` (its cells are over the others).
    ``list_runs``: also list the diverged or failed runs (once per page: the headline table)."""
    runs = list(runs)
    bad = diverged_runs(runs)
    if not rows:
        if bad:
            return "| variant | status |\n|---|---|\n" + "".join(
                f"| `{v}` | {_status_word(bad, v)} (every run) |\n" for v in sorted({r.variant for r in bad})
            ) + "\n" + divergence_notes(runs)
        return "(no results)\n"
    metric = metric or rows[0].metric
    variants = sorted({r.variant for r in rows} | {r.variant for r in bad})
    lengths = sorted({r.eval_length for r in rows})
    seeds = sorted({r.seed for r in rows} | {r.seed for r in runs})  # the comparison's, diverged ones included
    train_length = rows[0].train_length
    values = _by(rows, metric, "all")
    better = "higher" if next((r for r in rows if r.metric == metric), rows[0]).higher_is_better else "lower"
    head = [f"{metric} ({better} is better) at length →"] + [
        f"{n}{' (train)' if n == train_length else ''}" for n in lengths
    ] + ["params", f"state KiB @{lengths[-1]}", "train tok/s", "wall s", "backend"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    marked: list[str] = []
    for v in variants:
        mine = [r for r in rows if r.variant == v]
        if not mine:
            lines.append("| " + " | ".join([f"`{v}`", *([_status_word(bad, v)] * len(lengths)), "–", "–", "–", "–", "–"]) + " |")
            continue
        mark = " †" if any(r.variant == v for r in bad) else ""
        if mark:
            marked.append(v)
        longest = [r for r in mine if r.eval_length == lengths[-1]]
        per_seed = {r.seed: r for r in mine}
        cells = [cell(values[(v, n)]) if values.get((v, n)) else "–" for n in lengths]
        lines.append(
            "| " + " | ".join([
                f"`{v}`{mark}",
                *cells,
                f"{mine[0].parameters:,}",
                _kib(max(r.state_bytes for r in longest)) if longest else "–",
                f"{statistics.fmean(r.tokens_per_s for r in per_seed.values()):,.0f}",
                f"{statistics.fmean(r.wall_s for r in per_seed.values()):.0f}",
                "+".join(sorted({r.backend for r in mine})),
            ]) + " |"
        )
    note = f"\n{len(seeds)} seed(s): {', '.join(map(str, seeds))}; cells are mean ± standard deviation over seeds.\n"
    if marked:
        over = "; ".join(f"`{v}`: seed(s) {', '.join(str(x) for x in sorted({r.seed for r in rows if r.variant == v}))}" for v in marked)
        note += f"† some runs of this variant diverged or failed: its cells are over the runs that did not ({over}).\n"
    if bad and list_runs:
        note += "\n" + divergence_notes(runs)
    return "\n".join(lines) + "\n" + note


def _status_word(bad: list[RunSummary], variant: str) -> str:
    """'diverged' or 'failed' for a variant none of whose runs has numbers."""
    return "failed" if all(r.status == "failed" for r in bad if r.variant == variant) else "diverged"


def slice_table(rows: list[ResultRow], metric: str, length: int, runs: Iterable[RunSummary] = ()) -> str | None:
    """The headline metric by slice (depth, number of pairs) at one length, if the task has
    slices; variants with diverged or failed runs marked as in :func:`markdown_table`."""
    slices = sorted({r.slice for r in rows if r.metric == metric and r.slice != "all"}, key=_slice_key)
    if not slices:
        return None
    bad = diverged_runs(list(runs))
    mine = [r for r in rows if r.eval_length == length]
    head = [f"{metric} at length {length}, by slice →", *slices]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in sorted({r.variant for r in mine} | {r.variant for r in bad}):
        if not any(r.variant == v for r in mine):
            lines.append("| " + " | ".join([f"`{v}`", *([_status_word(bad, v)] * len(slices))]) + " |")
            continue
        cells = []
        for s in slices:
            vals = [r.value for r in mine if r.variant == v and r.metric == metric and r.slice == s]
            cells.append(cell(vals) if vals else "–")
        lines.append("| " + " | ".join([f"`{v}`{' †' if any(r.variant == v for r in bad) else ''}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def _slice_key(s: str) -> tuple[str, float]:
    name, _, value = s.partition("=")
    try:
        return (name, float(value))
    except ValueError:
        return (name, float("inf"))


def markdown(board: Leaderboard, image: str | None = None, loss_image: str | None = None) -> str:
    rows = list(board.rows)
    if not rows:
        shown = f"![{board.task}: every run diverged]({image})\n\n" if image and board.runs else ""
        made = f"Made by:\n\n```\n{board.command}\n```\n\n" if board.command else ""
        return f"# `{board.task}` leaderboard\n\n" + shown + made + markdown_table([], runs=board.runs) + "\n" + _settings(board, rows)
    headline = rows[0].metric
    lengths = sorted({r.eval_length for r in rows})
    parts = [f"# `{board.task}` leaderboard\n"]
    if image:
        parts.append(f"![{board.task}: {headline} vs length]({image})\n")
    if board.command:
        parts.append(f"Made by:\n\n```\n{board.command}\n```\n")
    parts.append(markdown_table(rows, headline, board.runs))
    if loss_image:
        parts.append(f"![{board.task}: training loss]({loss_image})\n")
    for n in lengths:
        table = slice_table(rows, headline, n, board.runs)
        if table:
            parts.append(table)
    others = sorted({r.metric for r in rows} - {headline})
    for metric in others:
        parts.append(markdown_table(rows, metric, board.runs, list_runs=False))
    parts.append(_settings(board, rows))
    return "\n".join(parts)


def _settings(board: Leaderboard, rows: list[ResultRow]) -> str:
    """The settings line of a leaderboard page."""
    s = board.settings
    train = s.get("train", {}) if isinstance(s.get("train"), dict) else {}
    decay = {"matrices": "weight matrices only", "all": "every parameter"}.get(train.get("decay", "all"), "?")
    worlds = sorted({(r.provenance.world_size, r.provenance.dist_backend or "") for r in rows})
    parallel = ", ".join("1 process" if w == 1 else f"{w} processes ({b}, data parallel)" for w, b in worlds)
    return (
        "Settings: "
        f"model {s.get('model', '?')}; train {s.get('train', '?')}; eval {s.get('eval', '?')} at lengths "
        f"{board.eval_lengths}; task options {s.get('task_options', '?')}; variant options {board.variant_options}; "
        f"AdamW weight decay on {decay}" + (f"; trained on {parallel}" if parallel else "") + ".\n"
    )


def build_leaderboard(config: CompareConfig, records: list[RunRecord], command: str | None = None) -> Leaderboard:
    settings = config.model_dump(mode="json")
    settings["variants"] = config.variant_names
    return Leaderboard(
        task=config.task,
        command=command,
        settings=settings,
        eval_lengths=list(config.eval_lengths),
        variant_options={r.spec.variant: r.spec.variant_options for r in records},
        runs=[r.summary() for r in records],
        rows=[row for r in records for row in r.rows],
    )


def _or_none_left(result: Path | str, path: Path) -> Path | str:
    """A plot skipped for want of data leaves no file behind: an older comparison's plot at
    ``path`` would otherwise sit beside this board as if it were its own. Skipped for want
    of matplotlib, an older plot is kept (it may be this very board's, re-rendered) and said."""
    from memzoo.compare.plots import MISSING

    if isinstance(result, Path) or not path.exists():
        return result
    if result == MISSING:
        return f"{result}; the older {path.name} there is left as it was (it may be of another board)"
    path.unlink()
    return f"{result} (removed the older {path.name}, which was not of this board)"


def write_leaderboard(board: Leaderboard, out: str | Path, *, stem: str | None = None) -> dict[str, Path | str]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` into ``out``.
    Returns the paths written; ``"png"`` is a message instead when the plot was skipped
    (and a plot of that name already there, an older board's, is removed)."""
    from memzoo.compare.plots import plot_headline, plot_losses

    out = Path(out)
    stem = stem or board.task
    markdown(board, image=f"{stem}.png")  # fails here, before any file is written, if the board cannot be shown
    written: dict[str, Path | str] = {}
    json_path = out / f"{stem}.json"
    write_atomic(json_path, dump(board))
    written["json"] = json_path
    png = _or_none_left(plot_headline(board, out / f"{stem}.png"), out / f"{stem}.png")
    written["png"] = png
    loss_png = _or_none_left(plot_losses(board, out / f"{stem}-loss.png"), out / f"{stem}-loss.png")
    written["loss png"] = loss_png
    md_path = out / f"{stem}.md"
    write_atomic(md_path, markdown(
        board, image=f"{stem}.png" if isinstance(png, Path) else None,
        loss_image=f"{stem}-loss.png" if isinstance(loss_png, Path) else None,
    ))
    written["md"] = md_path
    return written
