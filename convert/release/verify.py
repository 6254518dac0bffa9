"""python -m convert.verify FOLDER [--src SRC]: check a release folder against its manifest.json.

Exit status 1 when a file is missing, extra or changed (size or sha256), when the manifest records a
failed check, or, with --torch, when the torch source is not the one the release was made from or
parity against it fails (convert.parity on the library and the exported programs, re-run now).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convert.errors import ConversionError
from riffusion.files import is_present, model_root, plain_file
from convert.release.manifest import check_files, read_manifest
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party


def verify_release(folder: Path, torch_src: str | None = None, quiet: bool = False) -> dict:
    """The verdict on `folder`: {"passed", "files": {...}, "recorded_parity": {...}, "parity": {...}}."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = check_files(folder, manifest)
    _say(quiet, f"{folder}: {manifest.get('name')}, {len(manifest['files'])} files in the manifest")
    _say(quiet, f"files: {files.checked} checked, {len(files.missing)} missing, {len(files.extra)} extra, "
                f"{len(files.changed)} changed")
    for kind, names in (("missing", files.missing), ("extra", files.extra), ("changed", files.changed)):
        for name in names:
            _say(quiet, f"  {kind}: {name}")
    recorded = recorded_failures(manifest)
    _say(quiet, "recorded parity: " + ("all checks passed" if not recorded else "FAILED " + ", ".join(recorded)))
    result = {
        "folder": str(folder),
        "files": {"checked": files.checked, "missing": files.missing, "extra": files.extra, "changed": files.changed},
        "recorded_parity_failures": recorded,
    }
    passed = files.passed and not recorded
    if torch_src is not None:
        result["torch_source"] = source_check(torch_src, manifest, quiet)
        result["parity"] = _rerun_parity(torch_src, folder, manifest, quiet)
        passed = passed and result["torch_source"]["passed"] and result["parity"]["passed"]
    result["passed"] = passed
    return result


def recorded_failures(manifest: dict) -> list[str]:
    """Names of the checks the manifest records as failed (a release should never hold any)."""
    parity = manifest.get("parity", {})
    library = parity.get("library", {}) if isinstance(parity, dict) else None
    library_checks = library.get("checks", []) if isinstance(library, dict) else None
    single = parity.get("single_file", {}) if isinstance(parity, dict) else None
    export = parity.get("export", []) if isinstance(parity, dict) else None
    if not (isinstance(library_checks, list) and isinstance(single, dict) and isinstance(export, list)
            and all(isinstance(check, dict) and isinstance(check.get("name"), str) for check in library_checks)
            and all(isinstance(check, dict) and isinstance(check.get("component"), str)
                    and isinstance(check.get("runtime"), str) for check in export)):
        raise ConversionError("manifest.json: malformed 'parity' section (expected {library: {checks: [...]}, "
                              "single_file: {...}, export: [...]})")
    failed = [check["name"] for check in library_checks if check.get("passed") is not True]
    if single.get("passed") is not True:
        failed.append("single_file")
    failed += [f"{check['component']}[{check['runtime']}]" for check in export if check.get("passed") is not True]
    return failed


def source_check(torch_src: str, manifest: dict, quiet: bool) -> dict:
    """Are the torch source's weight files the ones the release was made from (sha256)?"""
    from convert.release.manifest import describe_files
    from convert.source import resolve

    source = manifest.get("source", {})
    if source.get("kind") == "single_file":
        raise ConversionError("the release was made from a single file: there is no torch diffusers repo to "
                              "compare with (--torch applies to releases made from one)")
    folder = resolve(torch_src, source.get("revision") if source.get("kind") == "hub" else None)
    expected = source.get("weights", {})
    if not isinstance(expected, dict):
        raise ConversionError("manifest.json: malformed 'source' section ('weights' should be a table)")
    root = model_root(folder)
    missing = [name for name in expected if not is_present(folder / name)]
    for name in expected:
        if name not in missing:
            plain_file(folder / name, root)
    found = describe_files(folder, [name for name in expected if name not in missing])
    differ = [name for name, entry in found.items() if entry["sha256"] != expected[name]["sha256"]]
    passed = bool(expected) and not missing and not differ
    _say(quiet, f"torch source: {len(expected)} weight files, {len(missing)} missing, {len(differ)} differ from "
                f"those the release was made from")
    return {"missing": missing, "differ": differ, "passed": passed}


def _rerun_parity(torch_src: str, folder: Path, manifest: dict, quiet: bool) -> dict:
    from convert.parity import format_table, run_parity, to_json

    export = manifest.get("artefacts", {}).get("export", {}).get("folder")
    exported = folder / export if export and (folder / export).is_dir() else None
    checks, settings = run_parity(torch_src, folder, exported=exported, progress=not quiet)
    _say(quiet, format_table(checks))
    return to_json(checks, settings)


def add_release_folder(parser: argparse.ArgumentParser, help: str) -> None:
    """The release folder, as verify and publish both take it: FOLDER, or `--folder FOLDER` (the alias;
    publish's first spelling)."""
    parser.add_argument("folder", nargs="?", type=Path, metavar="FOLDER", help=help)
    parser.add_argument("--folder", dest="folder_option", type=Path, metavar="FOLDER",
                        help="the same as FOLDER (an alias kept for older scripts)")


def release_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    given = {folder for folder in (args.folder, args.folder_option) if folder is not None}
    if not given:
        parser.error("the release folder is required: FOLDER (or --folder FOLDER)")
    if len(given) > 1:
        parser.error(f"two release folders given: {args.folder} and --folder {args.folder_option}")
    return given.pop()


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.verify", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=HelpFormatter)
    add_version(parser)
    add_release_folder(parser, "a release folder (python -m convert --release), e.g. a Hub download")
    parser.add_argument("--src", "--torch", dest="torch", help="the torch source (Hub id or diffusers folder): also re-run parity against it")
    parser.add_argument("--json", type=Path, help="also write the verdict here")
    parser.add_argument("--quiet", action="store_true", help="print the verdict only")
    args = parser.parse_args(argv)
    args.folder = release_folder(parser, args)
    quiet_third_party()
    result = verify_release(args.folder, args.torch, args.quiet)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"verify: {'OK' if result['passed'] else 'FAILED'} ({args.folder})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
