"""Files shared by convert, export and riffusion: reading input files safely, JSON input, and atomic output
folders (built beside the destination, renamed into place only when complete).

The rule for reading a model folder (a source, a library, a release): only regular files are read, and
only where their real location (after every link) lies inside the folder, or for a Hugging Face cache
snapshot inside its cached repo. A link leaving the folder, a dangling link, a device file, FIFO or socket
is refused with one line naming it; nothing is ever read from it, so no outside file can end up in an output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

from riffusion.errors import InputError, Terminated


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
    try:
        real = path.resolve()
    except RuntimeError:  # Python < 3.13 on a loop of links
        raise InputError(f"{path}: a loop of links") from None
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
    plain_file(path, root if root is not None else Path(os.path.realpath(path)).parent)
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


STAGING = re.compile(r"\.(partial|replaced|work)-(\d+)(-.*)?$")


def staging_path(out: Path) -> Path:
    """Where this process builds `out` (beside it, so the final rename is atomic). Staging left beside `out`
    by processes that died (SIGKILL, power loss) is removed and reported; while a live process is
    writing `out`, this one is refused rather than racing it."""
    out = Path(out).absolute()
    prefix = f".{out.name}."
    for path in out.parent.glob(glob.escape(prefix) + "*-*") if out.parent.is_dir() else ():
        match = STAGING.match(path.name[len(prefix) - 1:])
        if not path.name.startswith(prefix) or not match:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _alive(pid):
            raise InputError(f"{out}: another process (pid {pid}) is writing it now ({path.name}); wait for it, "
                             f"or remove {path} if that process is not a conversion")
        _remove(path)
        if pid != os.getpid():
            print(f"removed {path}: left by process {pid}, which is no longer running", file=sys.stderr)
    return out.parent / f"{prefix}partial-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def interrupted_by_sigterm():
    """Inside the block SIGTERM raises KeyboardInterrupt, like Ctrl-C, so that the cleanup of a failed
    write runs (a plain SIGTERM would end the process on the spot, leaving staging behind)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure (SIGTERM included) it
    is removed. `out` is checked again just before the rename: one written meanwhile is not replaced
    without `overwrite`. An OS error (disk full, read-only destination) becomes one InputError line."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    with interrupted_by_sigterm(), os_errors_as_input_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(out)
        staging.mkdir()
        try:
            yield staging
            check_destination(out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
        if out.exists():
            out.rename(replaced)
        staging.rename(out)
        shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def os_errors_as_input_errors(out: Path):
    """An OSError inside the block (ENOSPC, EROFS, EACCES...) as one line naming the file and the reason."""
    try:
        yield
    except OSError as error:
        where = error.filename if error.filename is not None else out
        raise InputError(f"{where}: {error.strerror or error}") from None
