class InputError(Exception):
    """Bad input the user must fix. The message is one line naming the file, the value and what was
    expected; every command-line entry point prints it and exits non-zero. The converter's and the
    exporter's errors are kinds of it, so helpers shared by all three packages raise this one."""
