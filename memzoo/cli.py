"""The ``memzoo`` command.

    memzoo compare                       # the main job: every variant, tiny passkey, prints the table
    memzoo compare --task mqar --variants fam,bswa --seeds 0,1 --out leaderboards/
    memzoo list                          # registered variants (with their own fields) and tasks
    memzoo render leaderboards/passkey.json   # re-write its .md/.png from the rows (no training)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Sequence

from memzoo.errors import MemzooError


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _assignment(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as JSON, else the raw string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def build_parser() -> argparse.ArgumentParser:
    from memzoo.compare.settings import PRESETS

    parser = argparse.ArgumentParser(
        prog="memzoo", description="memzoo: a zoo of attention-memory architectures behind one streaming interface."
    )
    sub = parser.add_subparsers(dest="command", metavar="{compare,list,render,generate}")
    from memzoo.cli_generate import add_parser as add_generate  # `memzoo generate`: sets args.run

    add_generate(sub)
    sub.add_parser("list", help="list registered variants (with their own fields) and tasks")
    r = sub.add_parser(
        "render", help="re-write the .md and .png beside a leaderboard JSON from its rows (no training)"
    )
    r.add_argument("json", help="a leaderboard file written by `memzoo compare --out`, e.g. leaderboards/passkey.json")
    c = sub.add_parser(
        "compare",
        help="train and evaluate variants on one task under one budget; print the table, optionally write a leaderboard",
        description="Train and evaluate variants on one task under the same budget and seeds, print the table and "
        "(with --out) write <task>.json, <task>.md and <task>.png. Without arguments: every registered variant on the "
        "tiny passkey preset (a few minutes on 2 CPU cores).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  memzoo compare\n"
        "  memzoo compare --task mqar --variants fam,bswa,xl,rmt --seeds 0,1,2 --out leaderboards/\n"
        "  memzoo compare --task copy --set train.steps=300 --set eval.lengths=[64,256] --option fam.fam_len=4\n",
    )
    c.add_argument("--task", default="passkey", help="task name (default: passkey; see `memzoo list`)")
    c.add_argument("--variants", type=_csv, default=None, help="comma-separated variant names (default: all registered)")
    c.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named settings to start from (default: tiny)")
    c.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=None, help="comma-separated seeds (default: 0)")
    c.add_argument("--steps", type=int, default=None, help="training steps (shortcut for --set train.steps=N)")
    c.add_argument(
        "--set", dest="sets", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
        help="override a setting by dotted path, value as JSON: train.length=64, eval.lengths=[64,256], "
        "model.d_model=64, task_options.n_digits=3 (repeatable)",
    )
    c.add_argument(
        "--option", dest="options", type=_assignment, action="append", default=[], metavar="VARIANT.FIELD=VALUE",
        help="a variant's own field, e.g. fam.fam_len=4 (repeatable)",
    )
    c.add_argument("--backend", default=None, help="attention backend (default: auto)")
    c.add_argument("--device", default=None, help="torch device (default: cpu)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads during runs (default: 1; 0 = leave torch's default)")
    c.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1),
        help="runs at once, in worker processes (default: min(2, CPU count)); results do not depend on it",
    )
    c.add_argument("--out", default=None, help="write <task>.json/.md/.png here (and finished runs under OUT/runs/)")
    c.add_argument("--results-dir", default=None, help="where finished runs are kept for resuming (default: OUT/runs)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--quiet", action="store_true", help="only the table on stdout")
    return parser


def cmd_list() -> int:
    import memzoo
    from memzoo.tasks import get_task, list_tasks

    print("variants:")
    for name in memzoo.list_variants():
        fields = memzoo.get_variant(name).config.model_fields
        own = ", ".join(f"{k}={v.default!r}" for k, v in fields.items()) or "(no own fields)"
        print(f"  {name:<12} {own}")
    print("tasks:")
    for name in list_tasks():
        cls = get_task(name)
        print(f"  {name:<12} metrics: {', '.join(cls.metrics)}")
    return 0


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from memzoo.compare.leaderboard import build_leaderboard, markdown, write_leaderboard
    from memzoo.compare.runner import compare_runs
    from memzoo.compare.settings import CompareConfig, merge, preset

    fields = preset(args.preset, args.task)
    for path, value in args.sets:
        fields = merge(fields, _nest(path, value))
    for path, value in args.options:
        if len(path) != 2:
            raise MemzooError(f"--option takes VARIANT.FIELD=VALUE, got {'.'.join(path)!r}")
        fields = merge(fields, {"variant_options": _nest(path, value)})
    if args.variants is not None:
        fields["variants"] = args.variants
    if args.seeds is not None:
        fields["seeds"] = args.seeds
    if args.steps is not None:
        fields = merge(fields, {"train": {"steps": args.steps}})
    for key in ("backend", "device"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    config = CompareConfig(**fields)
    results_dir = args.results_dir or (f"{args.out.rstrip('/')}/runs" if args.out else None)
    start = time.perf_counter()
    records = compare_runs(
        config,
        results_dir=results_dir,
        progress=False if args.no_progress else None,
        quiet=args.quiet,
        threads=args.threads or None,
        jobs=args.jobs,
    )
    command = "memzoo compare " + shlex.join(argv[1:] if argv and argv[0] == "compare" else argv)
    board = build_leaderboard(config, records, command=command.strip())
    if args.out:
        written = write_leaderboard(board, args.out)
        for kind, where in written.items():
            if not args.quiet:
                print(f"memzoo compare: {kind}: {where}", file=sys.stderr)
    print(markdown(board))
    if not args.quiet:
        print(f"memzoo compare: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def cmd_render(path: str) -> int:
    from pathlib import Path

    from memzoo.compare.leaderboard import write_leaderboard
    from memzoo.compare.results import load_leaderboard

    board = load_leaderboard(path)
    for kind, where in write_leaderboard(board, Path(path).parent, stem=Path(path).stem).items():
        print(f"memzoo render: {kind}: {where}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "run", None):
            return args.run(args)
        if args.command == "list":
            return cmd_list()
        if args.command == "render":
            return cmd_render(args.json)
        if args.command == "compare":
            return cmd_compare(args, argv)
        parser.print_help()
        return 0
    except (MemzooError, ValueError) as exc:
        print(f"memzoo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
