"""Files shared by convert, export and riffusion: JSON input, and atomic output folders (built beside the
destination, renamed into place only when complete)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from riffusion.errors import InputError


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
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
