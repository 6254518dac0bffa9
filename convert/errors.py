from riffusion.errors import InputError


class ConversionError(InputError):
    """Bad input the user must fix. The message is one line naming the file, the tensor and what was
    expected; command-line entry points print it and exit non-zero."""
