"""The `filip` command. Heavy libraries are imported inside each command so `--help` is instant."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable

from pipeline.config_yaml import add_set_option

DESCRIPTION = """\
Build FILIP300M-style image-text corpora on Ray and pre-train FILIP on them.

  filip build CONFIG        download, filter, deduplicate, back-translate and shard a URL list
  filip stats OUTPUT        print the funnel of a run (rows per stage, drops per reason)
  filip demo                run the whole job on a generated sample web served on 127.0.0.1
  filip retry-failed OUTPUT write the rows that failed to download as a new URL list
  filip train CONFIG        pre-train FILIP on the shards (one process, or many under torchrun)
  filip eval CHECKPOINT     zero-shot classification, retrieval and linear probe
  filip align CHECKPOINT IMAGE TEXT   draw the word-patch alignment of one image and caption
"""
EPILOG = """\
exit codes:
  0  success
  1  unexpected error, a bug: its traceback is printed (please report it with the traceback)
  2  expected error (bad config, input, path or usage): one line `error: <message>` on stderr;
     `filip -v COMMAND ...` or FILIP_DEBUG=1 also prints its traceback, e.g. for a bug report
"""
DEBUG_VARIABLE = "FILIP_DEBUG"
MAX_MESSAGE_CHARS = 1500  # an error message stays one readable line, whatever the input holds
# OS errors on a path the user named (a missing file, a folder that cannot be written) are reported
# as `path: reason`; other exceptions are bugs.
PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="run the corpus pipeline on a URL list",
        description="Run every stage on the URL list named in CONFIG. Re-running the same command "
                    "after a crash resumes: completed shards are skipped.")
    p.add_argument("config", help="YAML config (see configs/demo.yaml, configs/cluster-example.yaml)")
    p.add_argument("--input", help="override run.input (URL list: Parquet, CSV, TSV or JSON Lines)")
    p.add_argument("--output", help="override run.output (local folder or s3://, gs:// URL)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    add_set_option(p)
    p.set_defaults(func=_run_build)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Every `--set KEY=VALUE` in order, then the shortcuts --input, --output and --ray-address."""
    from pipeline.config_yaml import parse_set_options

    out = parse_set_options(args.set)
    shortcuts = {"run.input": args.input, "run.output": args.output, "run.ray_address": args.ray_address}
    out.update({key: value for key, value in shortcuts.items() if value})
    return out


def _run_build(args: argparse.Namespace) -> int:
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.funnel import format_funnel
    from pipeline.ray_adapter import stop_ray

    config = load_config(args.config, _overrides(args))
    try:
        summary = build(config)
    finally:
        stop_ray()
    print(format_funnel(summary))
    print(f"\noutput: {config.run.output}")
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="print the funnel of a finished or running build",
                       description="Print each stage's rows in and out and every drop or failure "
                                   "reason with its count and share, from OUTPUT/stats.json.")
    p.add_argument("output", help="the output folder of a build")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from pipeline.funnel import format_funnel, load_summary

    summary = load_summary(args.output)
    print(format_funnel(summary))
    if args.html:
        from pipeline.report import write_html_report

        write_html_report(args.output, args.html)
        print(f"\nHTML report: {args.html}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole job on a generated sample web (127.0.0.1 only)",
                       description="Generate a small sample web (varied images, duplicates, broken "
                                   "URLs), serve it on 127.0.0.1, run every stage with configs/demo.yaml "
                                   "(tiny random-weight translation models built on the spot), print "
                                   "the statistics and write OUTPUT/report.html, then train the tiny "
                                   "FILIP model briefly and print its evaluation.")
    p.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--config", default=None, help="config to use (default: configs/demo.yaml)")
    p.add_argument("--skip-train", action="store_true", help="stop after the corpus is built")
    p.add_argument("--steps", type=int, default=60, help="training steps of the tiny model (default 60)")
    add_set_option(p)  # the corpus config's keys; run.input and run.output are the demo's own
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.config_yaml import parse_set_options
    from pipeline.demo import run_demo

    return run_demo(args.output, args.config, train=not args.skip_train, steps=args.steps,
                    overrides=parse_set_options(args.set))


def _add_retry(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retry-failed", help="write the rows that failed to download as a URL list",
                       description="Collect every row of OUTPUT that failed to download (optionally "
                                   "only some reasons) into a Parquet URL list with the original "
                                   "columns and row_id, to feed to a new `filip build`.")
    p.add_argument("output", help="the output folder of a build")
    p.add_argument("--to", required=True, help="Parquet file to write")
    p.add_argument("--reason", action="append",
                   help="only this failure reason (repeatable), e.g. timeout; a reason no row of the "
                        "run failed with is an error that lists the reasons there are")
    p.set_defaults(func=_run_retry)


def _run_retry(args: argparse.Namespace) -> int:
    from pipeline.retry import write_failed_rows

    n = write_failed_rows(args.output, args.to, args.reason)
    print(f"{n} failed rows written to {args.to}")
    return 0


# The model commands import torch, so their parsers are built only when they run: `filip --help`
# stays instant, and everything after the command name goes to the command's own parser (which
# also answers `filip train --help` with the full options).
MODEL_COMMANDS = {
    "train": ("filip.trainer", "pre-train FILIP (or CLIP) on WebDataset shards"),
    "eval": ("filip.evaluate", "evaluate a checkpoint: zero-shot, retrieval, linear probe"),
    "align": ("filip.align", "draw word-patch alignment for one image and caption"),
}


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    for name, (_, help_text) in MODEL_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)


def run_model_command(name: str, argv: list[str]) -> int:
    import importlib

    module_name, help_text = MODEL_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"filip {name}", description=help_text)
    module.add_cli_arguments(parser)
    return int(module.cli_main(parser.parse_args(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filip", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an expected error too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_build(sub)
    _add_stats(sub)
    _add_demo(sub)
    _add_retry(sub)
    _add_model_commands(sub)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def expected_error_message(error: BaseException) -> str | None:
    """The one-line message of an expected error, or None for a bug."""
    from pipeline.errors import UserError

    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, PATH_ERRORS):
        message = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
    else:
        return None
    message = re.sub(r"\s*\n\s*", " ", message.strip()) or type(error).__name__
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


def run_reporting_errors(command: Callable[[], int], debug: bool) -> int:
    """The one error path of every command: an expected error is one line and exit 2, anything
    else its traceback and exit 1."""
    try:
        return command()
    except Exception as error:  # argparse's SystemExit and Ctrl-C pass through unchanged
        message = expected_error_message(error)
        if message is None:
            traceback.print_exc()
            print("filip: unexpected error (a bug); please report it with the traceback above",
                  file=sys.stderr)
            return 1
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] in MODEL_COMMANDS:
        args = parser.parse_args(argv[:command_at])  # global options before the command
        _configure_logging(args)
        name, rest = argv[command_at], argv[command_at + 1:]
        return run_reporting_errors(lambda: run_model_command(name, rest), _debug(args))
    args = parser.parse_args(argv)
    _configure_logging(args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_reporting_errors(lambda: int(args.func(args) or 0), _debug(args))


def _debug(args: argparse.Namespace) -> bool:
    return bool(args.verbose or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"))


if __name__ == "__main__":
    sys.exit(main())
