"""edgekit: take a vision model from PyTorch to an embedded device.

One sub-command per pipeline stage, each a thin map from flags to the stage's config
object and function (see :mod:`edgekit.api`).

The error boundary of every stage is here: an expected failure (bad input, an unwritable
or full output, a missing optional dependency, running out of memory) prints one line and
exits 2; a failed check (export parity) exits 1; an interrupt (Ctrl-C or SIGTERM) exits
130 after the stage has removed its temporary files; anything else is a bug in edgekit and
keeps its traceback, followed by a line asking to report it (exit 3).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback

from edgekit.errors import EdgekitError

BUG_EXIT = 3
# The modules that add sub-commands, in the order `edgekit --help` lists them.
COMMAND_MODULES = ("edgekit.cli.demo", "edgekit.cli.pretrain", "edgekit.cli.train", "edgekit.cli.data",
                   "edgekit.cli.quantize", "edgekit.cli.export", "edgekit.cli.bench")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``edgekit CMD: error: ...``) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="edgekit", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party warnings and library messages (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so every ``finally`` (temporary files, staging
    folders) runs as it does for Ctrl-C; the previous handler comes back afterwards."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from edgekit.output import show_third_party

    from edgekit.cli.bench import route

    try:
        args = build_parser().parse_args(route(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    command = f"edgekit {args.command}"
    if args.verbose:
        show_third_party()
    with _sigterm_as_interrupt():
        try:
            return args.func(args)
        except EdgekitError as exc:
            print(f"{command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"{command}: interrupted; temporary files removed, finished outputs kept", file=sys.stderr)
            return 130
        except MemoryError:
            print(f"{command}: error: out of memory; use smaller inputs (tile large scenes, lower --batch-size or "
                  f"--image-size)", file=sys.stderr)
            return 2
        except OSError as exc:
            from edgekit.fileio import describe_os_error

            print(f"{command}: error: {describe_os_error(exc)}", file=sys.stderr)
            return 2
        except Exception:
            traceback.print_exc()
            print(f"{command}: internal error: this is a bug in edgekit; please report it with the command line and "
                  f"the traceback above", file=sys.stderr)
            return BUG_EXIT


if __name__ == "__main__":
    sys.exit(main())
