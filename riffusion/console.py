"""What every command of the toolkit shares: a --version flag, silence for the third-party noise that is
not ours to show (their warnings and INFO logs on every run), and how a command ends on bad input or Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

from riffusion.errors import InputError, Terminated

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def tool_version() -> str:
    try:
        return version("riffusion-paddle")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--version", action="version", version=f"%(prog)s: riffusion-paddle {tool_version()}")
    return parser


def command(main):
    """Decorate a command's `main(argv) -> int`: bad input (InputError, the base of ConversionError and
    ExportError) ends it with one `error: ...` line on stderr and status 1; Ctrl-C (or SIGTERM where a
    staged write turned it into an interrupt) with one `interrupted` line and 130 (143 for SIGTERM), no
    traceback. Whatever was staged has been removed by then: the exception unwound through its cleanup."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as interrupt:
            print("interrupted", file=sys.stderr)
            return 128 + interrupt.signum if isinstance(interrupt, Terminated) else INTERRUPTED

    return run


def quiet_third_party() -> None:
    """Call before Paddle, ppdiffusers or paddlenlp are imported: some of it is printed at import time."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ warnings ("W... not support input out tensor")
    for message in ("No ccache found", "Setuptools is replacing distutils"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("datasets").setLevel(logging.WARNING)  # "PyTorch version ... available" at import
    # paddlenlp sets its logger to DEBUG when imported, so a level set now would not last; a filter does
    logging.getLogger("PaddleNLP").addFilter(lambda record: record.levelno >= logging.WARNING)


@contextlib.contextmanager
def native_stdout_silenced():
    """Drop what native code prints to the process's stdout meanwhile (the tokenizers library prints
    "Ignored unknown kwarg option __type" for every special token of an original CLIP tokenizer config)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        said = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not said and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text
