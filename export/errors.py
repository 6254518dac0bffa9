from riffusion.errors import InputError


class ExportError(InputError):
    """Bad input or a failed export check. The message is one line; `python -m export` prints it and
    exits non-zero."""
