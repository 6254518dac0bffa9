from convert.errors import ConversionError


class ExportError(ConversionError):
    """Bad input or a failed export check. The message is one line; `python -m export` prints it and
    exits non-zero. A kind of `ConversionError`, so the shared output helpers' errors read the same."""
