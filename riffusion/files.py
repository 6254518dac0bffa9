"""Files shared by convert, export and riffusion: reading input files safely, JSON input, and atomic output
folders (built beside the destination, renamed into place only when complete).

The rule for reading a model folder (a source, a library, a release): only regular files are read, and
only where their real location (after every link) lies inside the folder, or for a Hugging Face cache
snapshot inside its cached repo. A link leaving the folder, a dangling link, a device file, FIFO or socket
is refused with one line naming it; nothing is ever read from it, so no outside file can end up in an output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

from riffusion.errors import InputError


MAX_JSON_BYTES = 64 * 2**20  # a tokenizer's vocab.json is ~1 MB; a shard index a few


def model_root(folder: Path) -> Path:
    """The folder a model's files may really lie in: the model folder, or for a Hugging Face cache
    snapshot (snapshots/<commit>/, whose files are links into ../../blobs/) its cached repo."""
    real = Path(folder).resolve()
    return real.parent.parent if real.parent.name == "snapshots" else real


def is_present(path: Path) -> bool:
    """Whether anything is at `path`, a dangling link included (it must be refused, not skipped)."""
    return os.path.lexists(path)


def plain_file(path: Path, root: Path) -> Path:
    """`path`, if it is a regular file whose real location lies inside `root`; else one-line InputError."""
    path = Path(path)
    root = Path(root).resolve()
    if not os.path.lexists(path):
        raise InputError(f"{path}: missing")
    real = path.resolve()
    if real != root and root not in real.parents:
        raise InputError(f"{path}: leads outside {root} (to {real}); refusing to read it")
    try:
        mode = real.stat().st_mode
    except OSError:
        raise InputError(f"{path}: a dangling link (to {os.readlink(path)})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a folder, device, FIFO or socket); refusing to read it")
    return path


def copy_plain(path: Path, root: Path, target: Path) -> None:
    """Copy the bytes of `path` (checked by `plain_file`) into a new regular file `target`."""
    shutil.copyfile(plain_file(path, root), target, follow_symlinks=True)


def read_json(path: Path, root: Path | None = None) -> dict:
    """A JSON object from a regular file (inside `root` when given) of at most MAX_JSON_BYTES."""
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(f"{path}: missing")
    plain_file(path, root if root is not None else path.resolve().parent)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {path.stat().st_size} bytes, more than any config ({MAX_JSON_BYTES} at most)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(f"{path}: not a config (JSON nested too deeply)") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: not empty (pass --overwrite to replace it)")


def check_apart(out: Path, *sources: Path) -> None:
    """Refuse an output that is, holds or lies inside a source: --overwrite would delete it."""
    out = Path(out).resolve()
    for source in sources:
        source = Path(source).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise InputError(f"{out}: the output overlaps the source {source}")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        out.rename(replaced)
    staging.rename(out)
    shutil.rmtree(replaced, ignore_errors=True)
