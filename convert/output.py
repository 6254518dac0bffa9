"""Atomic output folders: build beside the destination, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from convert.errors import ConversionError


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: not empty (pass --overwrite to replace it)")


def check_apart(out: Path, *sources: Path) -> None:
    """Refuse an output that is, holds or lies inside a source: --overwrite would delete it."""
    out = Path(out).resolve()
    for source in sources:
        source = Path(source).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise ConversionError(f"{out}: the output overlaps the source {source}")


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
