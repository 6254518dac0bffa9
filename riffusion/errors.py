class InputError(Exception):
    """Bad input the user must fix. The message is one line naming the file, the value and what was
    expected; every command-line entry point prints it and exits non-zero. The converter's and the
    exporter's errors are kinds of it, so helpers shared by all three packages raise this one."""


class Terminated(KeyboardInterrupt):
    """A signal other than Ctrl-C's (SIGTERM) ending a command: unwinds like Ctrl-C so that staged output is
    removed, and the command exits with 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
