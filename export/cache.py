"""The UNet's static program of a library exported once, on first use, and reused: Paddle's dynamic mode
is about 20x slower than Paddle Inference on CPU, and the UNet runs at every denoising step (the text
encoder and the VAE run once per image, so exporting them would cost more time than it saves here).

The cache lives in $RIFFUSION_PADDLE_CACHE, else $XDG_CACHE_HOME/riffusion-paddle, else
~/.cache/riffusion-paddle, one folder per library state: the key hashes the library's real path and the
size and modification time of every file in it, with the riffusion-paddle and Paddle versions, so that a
changed library or tool exports again instead of running stale programs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


FOLDER = "exports"


def cache_root() -> Path:
    explicit = os.environ.get("RIFFUSION_PADDLE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "riffusion-paddle"


def library_key(library: Path) -> str:
    library = Path(library).resolve()
    state = [str(library)] + [_version(name) for name in ("riffusion-paddle", "paddlepaddle", "paddlepaddle-gpu")]
    for path in sorted(library.rglob("*")):
        if path.is_file():
            stat = path.stat()
            state.append(f"{path.relative_to(library).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(state).encode()).hexdigest()[:24]


def export_for(library: Path, exported: Path | None = None, runtime: str | None = None, quiet: bool = False) -> Path | None:
    """The export folder a command runs `library` with: `exported` when given, else a release's own
    export/, else (unless `runtime` is "dynamic") the cached static UNet. ExportError for runtime "onnx"
    without ONNX programs: it would otherwise quietly run something else."""
    from export.errors import ExportError
    from export.runtime import ONNX_MODEL
    from riffusion.layout import EXPORT_FOLDER

    library = Path(library)
    if exported is None and (library / EXPORT_FOLDER / "unet").is_dir():
        exported = library / EXPORT_FOLDER
    if runtime == "onnx" and not (exported is not None and (Path(exported) / "unet" / ONNX_MODEL).is_file()):
        raise ExportError(f"--runtime onnx: no ONNX programs {f'in {exported}' if exported else 'given'}; export "
                          f"them with python -m export --onnx and pass --export FOLDER (or choose --runtime static)")
    if exported is None and runtime != "dynamic":
        exported = cached_export(library, quiet)
    return exported


def cached_export(library: Path, quiet: bool = False) -> Path:
    """The folder of `library`'s static UNet program (Paddle Inference), exported now when not cached
    yet. Raises ExportError like python -m export."""
    from export.exporter import REPORT_NAME, export_library

    folder = cache_root() / FOLDER / f"{Path(library).resolve().name}-{library_key(library)}"
    if (folder / REPORT_NAME).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together (server replicas on one machine) export once: the others wait, then reuse it.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"{library}: another process is exporting its UNet into {folder}; waiting for it",
                      file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / REPORT_NAME).is_file():
            return folder
        if not quiet:
            print(f"{library}: no exported programs; exporting its UNet's static program once (minutes for a "
                  f"full-size model), cached in {folder}", file=sys.stderr, flush=True)
        export_library(library, folder, components=("unet",), onnx=False, quiet=quiet)
    return folder


def _version(name: str) -> str:
    try:
        return f"{name}={version(name)}"
    except PackageNotFoundError:
        return f"{name}=none"
