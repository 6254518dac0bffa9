import contextlib

from riffusion.errors import InputError

TORCH_MODULES = ("torch", "diffusers", "transformers")
CONVERT_EXTRA = "pip install 'riffusion-paddle[convert]'"


class ConversionError(InputError):
    """Bad input the user must fix. The message is one line naming the file, the tensor and what was
    expected; command-line entry points print it and exit non-zero."""


@contextlib.contextmanager
def needs_torch(command: str):
    """A [cpu] or [gpu] install has no torch: end `command` with one line naming the extra to install."""
    try:
        yield
    except ModuleNotFoundError as error:
        module = (error.name or "").partition(".")[0]
        if module not in TORCH_MODULES:
            raise
        raise SystemExit(f"error: {command} reads torch models and needs {module}, which the [cpu] and [gpu] "
                         f"installs leave out: {CONVERT_EXTRA}") from None
