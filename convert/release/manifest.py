"""manifest.json of a release folder: every file's sha256 and size, and the check of a folder against it.

Files the Hub or its clients add to a folder are not part of a release and are ignored both when
the manifest is written and when a folder is checked: `.gitattributes` (created with every Hub
repo), and anything under `.git/` or `.cache/` (huggingface_hub's download and resumable upload state).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from convert.errors import ConversionError
from convert.hashing import sha256_file
from riffusion.files import read_json

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
IGNORED_FILES = {MANIFEST_NAME, ".gitattributes"}
IGNORED_FOLDERS = {".git", ".cache"}


def release_files(folder: Path) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files that belong to the release in `folder`."""
    folder = Path(folder)
    names = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] in IGNORED_FOLDERS or relative.as_posix() in IGNORED_FILES:
            continue
        if path.is_symlink():
            raise ConversionError(f"{path}: a symbolic link; a release holds plain files only")
        if path.is_file():
            names.append(relative.as_posix())
        elif not path.is_dir():
            raise ConversionError(f"{path}: not a regular file (a device, FIFO or socket); a release holds plain files only")
    return sorted(names)


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}}; files are hashed on all cores (hashlib releases the GIL)."""
    folder = Path(folder)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(lambda name: sha256_file(folder / name), names))
    return {name: {"sha256": digest, "bytes": (folder / name).stat().st_size} for name, digest in zip(names, digests)}


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise ConversionError(f"{folder}: no such folder")
    if not path.exists() and not path.is_symlink():
        raise ConversionError(f"{path}: missing, not a release folder (make one with python -m convert --release)")
    if path.is_symlink():
        raise ConversionError(f"{path}: a symbolic link; a release holds plain files only")
    manifest = read_json(path, folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)
            for entry in files.values()):
        raise ConversionError(f"{path}: no valid 'files' table ({{path: {{sha256, bytes}}}})")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ConversionError(f"{path}: manifest_version {manifest.get('manifest_version')!r}, "
                              f"this tool reads version {MANIFEST_VERSION}")
    return manifest


@dataclass
class FileCheck:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # "name: why"

    @property
    def passed(self) -> bool:
        return not (self.missing or self.extra or self.changed)


def check_files(folder: Path, manifest: dict) -> FileCheck:
    """Compare the files in `folder` with the manifest: sizes first, then sha256 of those of the right size."""
    folder = Path(folder)
    expected: dict[str, dict] = manifest["files"]
    present = set(release_files(folder))
    result = FileCheck(missing=sorted(set(expected) - present), extra=sorted(present - set(expected)))
    same_size = []
    for name in sorted(present & set(expected)):
        size = (folder / name).stat().st_size
        if size != expected[name]["bytes"]:
            result.changed.append(f"{name}: {size} bytes, the manifest says {expected[name]['bytes']}")
        else:
            same_size.append(name)
    for name, entry in describe_files(folder, same_size).items():
        if entry["sha256"] != expected[name]["sha256"]:
            result.changed.append(f"{name}: sha256 {entry['sha256'][:12]}..., the manifest says {expected[name]['sha256'][:12]}...")
    result.checked = len(present & set(expected))
    result.changed.sort()
    return result
