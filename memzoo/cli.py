"""The ``memzoo`` command.

    memzoo compare                       # the main job: every variant, tiny passkey, prints the table
    memzoo compare --task mqar --variants fam,bswa --seeds 0,1 --out leaderboards/
    memzoo list                          # registered variants (with their own fields) and tasks
    memzoo render leaderboards/passkey.json   # re-write its .md/.png from the rows (no training)

Every user error is one line ``memzoo: error: ...`` on stderr with exit status 2,
before any training. ``memzoo compare`` exits 3 when a run diverged (its numbers are
not published; the table and the summary say which) and 1 when a run kept failing.
``python -m memzoo`` is the same command; under ``torchrun`` ``memzoo compare`` trains
each run data-parallel and rank 0 alone prints and writes.

Subcommands are registered in one place: :func:`register_command` (a name, a help
line, a function that adds its arguments, a function that runs it). A subcommand
living in its own module registers itself on import; name that module in
:data:`COMMAND_MODULES` (one line) and ``memzoo`` imports it when it builds its parser.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from memzoo.errors import MemzooError

#: exit statuses
EXIT_FAILED = 1  # the comparison finished, but a run kept failing (recorded as failed, no scores)
EXIT_USAGE = 2  # a user error: nothing was trained
EXIT_DIVERGED = 3  # the comparison finished, but at least one run diverged (no scores for it)


class UsageError(MemzooError):
    """A bad command line (printed as one ``memzoo: error: ...`` line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other user error."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.partition(" ")[2]  # "memzoo compare" -> "compare"
        raise UsageError(f"{sub}: {message}" if sub else message)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = _csv(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r} (omit the flag for every variant)")
    return names


def _seeds(text: str) -> list[int]:
    parts = _csv(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    try:
        return [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {n}")
        return n

    parse.__name__ = f"integer >= {least}"
    return parse


def _assignment(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as JSON, else the raw string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"expected key=value (key a dotted path), got {text!r}")
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


# ------------------------------------------------------------------ subcommands
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Sequence[str]], int]
    description: str | None = None
    epilog: str | None = None


COMMANDS: dict[str, Command] = {}
#: modules that register further subcommands when imported (``register_command`` at import)
COMMAND_MODULES: list[str] = ["memzoo.cli_generate"]


def register_command(command: Command) -> Command:
    """Add a subcommand (``memzoo NAME ...``). Duplicates raise."""
    if command.name in COMMANDS:
        raise ValueError(f"memzoo subcommand {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = _Parser(
        prog="memzoo", description="memzoo: a zoo of attention-memory architectures behind one streaming interface."
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help, epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
    return parser


# ----------------------------------------------------------------------- list
def _list_arguments(p: argparse.ArgumentParser) -> None:
    pass


def cmd_list(args: argparse.Namespace | None = None, argv: Sequence[str] = ()) -> int:
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


# -------------------------------------------------------------------- compare
def _compare_arguments(c: argparse.ArgumentParser) -> None:
    from memzoo.compare.settings import PRESETS

    c.add_argument("--task", default="passkey", help="task name (default: passkey; see `memzoo list`)")
    c.add_argument("--variants", type=_names, default=None, help="comma-separated variant names (default: all registered)")
    c.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named settings to start from (default: tiny)")
    c.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default: 0)")
    c.add_argument("--steps", type=_at_least(0), default=None, help="training steps (shortcut for --set train.steps=N)")
    c.add_argument(
        "--set", dest="sets", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
        help="override a setting by dotted path, value as JSON: train.length=64, eval.lengths=[64,256], "
        "model.d_model=64, task_options.n_digits=3 (repeatable)",
    )
    c.add_argument(
        "--option", dest="options", type=_assignment, action="append", default=[], metavar="VARIANT.FIELD=VALUE",
        help="a variant's own field, e.g. fam.fam_len=4 (repeatable; only for variants being run)",
    )
    c.add_argument(
        "--compile", action="store_true",
        help="train through torch.compile (shortcut for --set train.compile=true); the first step, which compiles, "
        "is timed apart (compile_s in the results)",
    )
    c.add_argument("--backend", default=None, help="attention backend (default: auto)")
    c.add_argument("--device", default=None, help="torch device (default: cpu)")
    c.add_argument(
        "--threads", type=_at_least(0), default=1, help="torch CPU threads during runs (default: 1; 0 = leave torch's default)"
    )
    c.add_argument(
        "--jobs", type=_at_least(1), default=min(2, os.cpu_count() or 1),
        help="runs at once, in worker processes (default: min(2, CPU count); 1 = in this process); "
        "results do not depend on it",
    )
    c.add_argument(
        "--launcher", default="local", choices=["local", "ray"],
        help="where runs execute: local (in this process, or --jobs worker processes) or ray (one Ray task per run; "
        "a local Ray cluster unless --address); results do not depend on it",
    )
    c.add_argument("--address", default=None, help="Ray cluster address for --launcher ray, e.g. ray://head:10001")
    c.add_argument(
        "--resources", type=_json_object, default=None, metavar="JSON",
        help='Ray resources per run, e.g. \'{"GPU": 1}\' or \'{"CPU": 2, "my_label": 1}\' (default: CPU = --threads)',
    )
    c.add_argument(
        "--retries", type=_at_least(0), default=2, help="times a failed run is retried before it is recorded as failed (default: 2)"
    )
    c.add_argument("--log-dir", default=None, help="write TensorBoard event files here (per run: loss, lr, eval metrics)")
    c.add_argument("--out", default=None, help="write <task>.json/.md/.png here (and finished runs under OUT/runs/)")
    c.add_argument("--results-dir", default=None, help="where finished runs are kept for resuming (default: OUT/runs)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--quiet", action="store_true", help="only the table on stdout")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"GPU\": 1}}': {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _writable_dir(flag: str, path: str) -> None:
    """Refuse, before training, a directory argument that names a file or cannot be made."""
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} exists and is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: {parent} is not writable")
            return


def _leaves(path: list[str], value: Any) -> list[tuple[tuple[str, ...], Any]]:
    """The settings one ``--set`` gives: a JSON object value gives each of its fields."""
    if isinstance(value, dict):  # {} sets nothing
        return [leaf for key, sub in value.items() for leaf in _leaves([*path, key], sub)]
    return [(tuple(path), value)]


def _check_given_once(args: argparse.Namespace) -> None:
    """Refuse a setting given both by ``--set`` and by a flag (``--steps``, ``--compile``,
    ``--variants``, ``--seeds``, ``--backend``, ``--device``, ``--option``): one of them
    would win silently. And ``--set task=...``: the task picks the preset's settings, so
    it is chosen with ``--task``."""
    leaves = [leaf for raw, value in args.sets for leaf in _leaves(raw, value)]
    for path, value in leaves:
        if path == ("task",) and value != args.task:
            raise UsageError(
                f"--set task={json.dumps(value)}: the task is chosen with --task (the preset's settings, its task options "
                f"included, are those of the task --task names, now {args.task!r}); valid: --task NAME, e.g. --task {value}"
            )
    given = [(path, f"--set {'.'.join(path)}={json.dumps(value)}") for path, value in leaves]
    flags: list[tuple[tuple[str, ...], str]] = []
    if args.steps is not None:
        flags.append((("train", "steps"), f"--steps {args.steps}"))
    if args.compile:
        flags.append((("train", "compile"), "--compile"))
    if args.variants is not None:
        flags.append((("variants",), f"--variants {','.join(args.variants)}"))
    if args.seeds is not None:
        flags.append((("seeds",), f"--seeds {','.join(map(str, args.seeds))}"))
    for key in ("backend", "device"):
        if getattr(args, key) is not None:
            flags.append(((key,), f"--{key} {getattr(args, key)}"))
    flags += [(("variant_options", *path), f"--option {'.'.join(path)}={json.dumps(value)}") for path, value in args.options]
    for flag_path, flag in flags:
        for set_path, where in given:
            n = min(len(flag_path), len(set_path))
            if flag_path[:n] == set_path[:n]:
                raise UsageError(
                    f"{'.'.join(flag_path)} is given twice, by {flag} and by {where}; give it once (one of them would "
                    "silently win)"
                )


def compare_config(args: argparse.Namespace) -> Any:
    """The :class:`~memzoo.compare.CompareConfig` of a ``memzoo compare`` command line."""
    from memzoo.compare.settings import CompareConfig, merge, preset

    fields = preset(args.preset, args.task)
    for path, value in args.sets:
        fields = merge(fields, _nest(path, value))
    for path, value in args.options:
        if len(path) != 2:
            raise UsageError(f"--option takes VARIANT.FIELD=VALUE, got {'.'.join(path)!r}")
        fields = merge(fields, {"variant_options": _nest(path, value)})
    _check_given_once(args)
    if args.variants is not None:
        fields["variants"] = args.variants
    if args.seeds is not None:
        fields["seeds"] = args.seeds
    if args.steps is not None:
        fields = merge(fields, {"train": {"steps": args.steps}})
    if args.compile:
        fields = merge(fields, {"train": {"compile": True}})
    for key in ("backend", "device"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    return CompareConfig(**fields)


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from memzoo.compare import distributed
    from memzoo.compare.leaderboard import build_leaderboard, describe_divergence, markdown, write_leaderboard
    from memzoo.compare.runner import compare_runs

    config = compare_config(args)
    for flag, where in (("--out", args.out), ("--results-dir", args.results_dir)):
        if where is not None:
            _writable_dir(flag, where)
    results_dir = args.results_dir or (f"{args.out.rstrip('/')}/runs" if args.out else None)
    if results_dir is not None:
        _writable_dir("--results-dir" if args.results_dir else "--out", results_dir)
    if args.log_dir is not None:
        _writable_dir("--log-dir", args.log_dir)
    if args.launcher != "ray" and (args.address is not None or args.resources):
        raise UsageError("--address and --resources are for --launcher ray")
    torchrun = distributed.launched()
    if torchrun and args.launcher != "local":
        raise UsageError("under torchrun each run trains data-parallel on every rank: use the local launcher")
    start = time.perf_counter()
    records = compare_runs(
        config,
        results_dir=results_dir,
        progress=False if args.no_progress else None,
        quiet=args.quiet,
        threads=args.threads or None,
        jobs=1 if torchrun else args.jobs,  # under torchrun each run is data-parallel, one after another
        launcher=args.launcher,
        address=args.address,
        resources=args.resources,
        retries=args.retries,
        log_dir=args.log_dir,
    )
    if torchrun and not distributed.context(config.device).is_main:
        return 0  # rank 0 alone writes and prints
    command = "memzoo compare " + shlex.join(argv[1:] if argv and argv[0] == "compare" else argv)
    board = build_leaderboard(config, records, command=command.strip())
    if args.out:
        written = write_leaderboard(board, args.out)
        for kind, where in written.items():
            if not args.quiet:
                print(f"memzoo compare: {kind}: {where}", file=sys.stderr)
    print(markdown(board))
    diverged = [r for r in board.runs if r.status == "diverged"]
    for run in diverged:
        print(f"memzoo compare: warning: {describe_divergence(run)}: no scores published for it", file=sys.stderr)
    if not args.quiet:
        print(f"memzoo compare: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    failed = [r for r in board.runs if r.status == "failed"]
    if failed:
        names = ", ".join(f"{r.variant} seed {r.seed}" for r in failed)
        print(f"memzoo compare: error: {len(failed)} run(s) failed: {names} (exit status {EXIT_FAILED})", file=sys.stderr)
        return EXIT_FAILED
    if diverged:
        print(f"memzoo compare: {len(diverged)} of {len(board.runs)} run(s) diverged (exit status {EXIT_DIVERGED})", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


# --------------------------------------------------------------------- render
def _render_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("json", help="a leaderboard file written by `memzoo compare --out`, e.g. leaderboards/passkey.json")


def cmd_render(args: argparse.Namespace | str, argv: Sequence[str] = ()) -> int:
    from memzoo.compare.leaderboard import write_leaderboard
    from memzoo.compare.results import load_leaderboard

    path = args if isinstance(args, str) else args.json
    board = load_leaderboard(path)  # a missing or invalid file: ResultsFileError, nothing written
    for kind, where in write_leaderboard(board, Path(path).parent, stem=Path(path).stem).items():
        print(f"memzoo render: {kind}: {where}", file=sys.stderr)
    return 0


register_command(Command("list", "list registered variants (with their own fields) and tasks", _list_arguments, cmd_list))
register_command(Command(
    "render", "re-write the .md and .png beside a leaderboard JSON from its rows (no training)", _render_arguments, cmd_render
))
register_command(Command(
    "compare",
    "train and evaluate variants on one task under one budget; print the table, optionally write a leaderboard",
    _compare_arguments,
    cmd_compare,
    description="Train and evaluate variants on one task under the same budget and seeds, print the table and "
    "(with --out) write <task>.json, <task>.md and <task>.png. Without arguments: every registered variant on the "
    "tiny passkey preset (under a minute on 2 CPU cores). Exit status: 0 done, 2 a user error (nothing trained), "
    f"{EXIT_DIVERGED} a run diverged (shown as such, with no scores), {EXIT_FAILED} a run kept failing (recorded as failed).",
    epilog="examples:\n"
    "  memzoo compare\n"
    "  memzoo compare --task mqar --variants fam,bswa,xl,rmt --seeds 0,1,2 --out leaderboards/\n"
    "  memzoo compare --task copy --set train.steps=300 --set eval.lengths=[64,256] --option fam.fam_len=4\n",
))


def error_line(exc: BaseException) -> str:
    """One line for a user error (pydantic's multi-line reports are folded)."""
    from pydantic import ValidationError

    from memzoo.errors import one_line

    text = one_line(exc) if isinstance(exc, ValidationError) else str(exc)
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = COMMANDS.get(args.command) if args.command else None
        if command is None:
            parser.print_help()
            return 0
        return command.run(args, argv)
    except (MemzooError, ValueError) as exc:  # ValueError includes pydantic's ValidationError
        print(f"memzoo: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memzoo: interrupted (finished runs are kept; rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
