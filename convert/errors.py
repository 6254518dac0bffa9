class ConversionError(Exception):
    """Bad input the user must fix. The message is one line naming the file, the tensor and what was
    expected; command-line entry points print it and exit non-zero."""
