"""python -m convert --src SRC --out DIR --release: the complete Hub folder of the Paddle release.

    DIR/model_index.json, unet/, vae/, ...     the ppdiffusers library (conversion_report.json)
    DIR/<source name>.safetensors + .yaml      the compiled single file in the original LDM layout
    DIR/export/<component>/...                 static programs (inference.json/.pdiparams) and ONNX
    DIR/seed_images/*.png                      riffusion-app's seed images and masks
    DIR/README.md                              MODEL_CARD.md filled in with this release's numbers
    DIR/manifest.json                          every file's sha256 and size, versions, source, parity

Every artefact is checked before DIR appears: the library and the exported programs against torch
(convert.parity, when the source is a torch diffusers repo), the programs against the Paddle models
(the export's own validation), and the single file by reading it back into the library layout and
comparing every tensor bitwise. All of it is built beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from convert.release.manifest import MANIFEST_VERSION, describe_files, release_files, write_manifest
from riffusion.files import atomic_folder, check_apart, check_destination, model_root, plain_file
from riffusion.layout import EXPORT_FOLDER, SEED_FOLDER
from convert.source import resolve

CARD_NAME = "README.md"
PACKAGES = ("riffusion-paddle", "paddlepaddle", "paddlepaddle-gpu", "ppdiffusers", "paddlenlp", "paddle2onnx", "onnx",
            "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "transformers", "safetensors", "huggingface_hub",
            "numpy")


def build_release(src: str, out: Path, *, revision: str | None = None, repo_id: str | None = None,
                  dtype: str = "float32", overwrite: bool = False, quiet: bool = False, check: bool = True,
                  config: str | None = None, ema: bool = False, components: tuple[str, ...] | None = None,
                  onnx: bool = True) -> dict:
    """Write the release folder `out`; returns its manifest. Raises ConversionError (nothing at `out`)."""
    from convert.library import convert_library
    from convert.single_file import write_single_file
    from export.exporter import export_library
    from export.specs import COMPONENTS

    out = Path(out)
    components = tuple(components or COMPONENTS)
    if "unet" not in components:
        raise ConversionError("a release holds the exported unet: add it to the export components")
    check_destination(out.absolute(), overwrite)
    single_source = Path(src).is_file()
    # resolved once, so that conversion and parity read the same snapshot of a Hub repo
    source_folder = None if single_source else resolve(src, revision)
    check_apart(out, Path(src) if single_source else source_folder)
    stem = source_name(src)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, overwrite) as staging, \
            tempfile.TemporaryDirectory(dir=out.absolute().parent, prefix=f".{out.name}.work-{os.getpid()}-") as work:
        work = Path(work)
        _step(quiet, "library")
        report = convert_library(src if single_source else str(source_folder), staging, dtype=dtype, overwrite=True,
                                 quiet=quiet, config=config, ema=ema)
        _step(quiet, "compiled single file")
        single = work / f"{stem}.safetensors"
        write_single_file(str(staging), single, dtype=dtype, quiet=quiet)
        single_parity = check_single_file(single, staging, work / "read-back", dtype)
        if not single_parity["passed"]:
            raise ConversionError(f"{single.name}: reading it back gives other tensors than the library "
                                  f"({single_parity['differ']} differ): nothing written")
        _step(quiet, "export")
        export_report = export_library(staging, work / EXPORT_FOLDER, components=components, onnx=onnx, quiet=quiet)
        library_parity = {"ran": False, "reason": "single-file source: no torch diffusers repo to compare with"
                          if single_source else "skipped (--no-check)"}
        if check and not single_source:
            _step(quiet, "parity against torch")
            from convert.parity import required_parity

            library_parity = required_parity(str(source_folder), staging, work / EXPORT_FOLDER, show=not quiet)

        _without_local_paths(staging / "conversion_report.json", work / EXPORT_FOLDER / "export_report.json",
                             source_folder or Path(src).parent, staging)
        for path in (single, single.with_suffix(".yaml"), work / EXPORT_FOLDER):
            path.rename(staging / path.name)
        seed_library = _copy_seed_images(source_folder, staging / SEED_FOLDER)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": out.name,
            "repo_id": repo_id or f"ORG/{out.name}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype,
            "source": describe_source(src, revision, source_folder, report),
            "versions": package_versions(),
            "artefacts": {
                "library": {"model_index": "model_index.json", "report": "conversion_report.json",
                            "parts": _library_parts(staging)},
                "single_file": {"file": single.name, "config": single.with_suffix(".yaml").name},
                "export": {"folder": EXPORT_FOLDER, "components": list(components), "onnx": onnx,
                           "report": f"{EXPORT_FOLDER}/export_report.json", "signatures": signatures(export_report),
                           "variants": variants(export_report)},
                "seed_images": seed_library,
                "model_card": CARD_NAME,
            },
            "parity": {"library": library_parity, "single_file": single_parity, "export": export_checks(export_report)},
        }
        from convert.release.card import render_card

        manifest["files"] = describe_files(staging, release_files(staging))  # the card's sizes come from here
        (staging / CARD_NAME).write_text(render_card(manifest), encoding="utf-8")
        manifest["files"] = dict(sorted({**manifest["files"], **describe_files(staging, [CARD_NAME])}.items()))
        write_manifest(staging, manifest)
    return manifest


def source_name(src: str) -> str:
    """riffusion/riffusion-model-v1, ./riffusion-model-v1/ and riffusion-model-v1.ckpt all give riffusion-model-v1."""
    path = Path(src)
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return src.rstrip("/").split("/")[-1]


def describe_source(src: str, revision: str | None, folder: Path | None, report: dict) -> dict:
    """Where the weights came from, precisely enough to fetch them again and check they are the same."""
    weights = {}
    for part in report["parts"].values():
        for entry in part["files"]:
            path = Path(entry["path"])
            name = path.resolve().relative_to(folder.resolve()).as_posix() if folder else path.name
            weights[name] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    # a local source by its name only: the manifest is published, the path on this machine is nobody's business
    if folder is None:
        config = report.get("config_folder")
        if config and Path(config).exists():
            config = Path(config).resolve().name
        source = {"kind": "single_file", "name": Path(src).name, "config": config}
    elif Path(src).is_dir():
        source = {"kind": "folder", "name": Path(src).resolve().name}
    else:
        snapshot = Path(folder).resolve()
        commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
        source = {"kind": "hub", "repo_id": src, "revision": commit}
    source["weights"] = dict(sorted(weights.items()))
    return source


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def check_single_file(single: Path, library: Path, work: Path, dtype: str = "float32") -> dict:
    """Read the single file back into a library (configs from `library`) and compare every weight
    tensor with the library's, bitwise: proves the LDM names and layouts go both ways."""
    from safetensors import safe_open

    from convert.library import convert_library

    convert_library(str(single), work, dtype=dtype, quiet=True, config=str(library))
    tensors = differ = 0
    for path in sorted(work.glob("*/*.safetensors")):
        relative = path.relative_to(work)
        with safe_open(str(path), "np") as back, safe_open(str(library / relative), "np") as original:
            names = set(back.keys()) | set(original.keys())
            for name in sorted(names):
                tensors += 1
                if name not in back.keys() or name not in original.keys():
                    differ += 1
                    continue
                a, b = back.get_tensor(name), original.get_tensor(name)
                differ += not (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8)))
    shutil.rmtree(work)
    return {"tensors": tensors, "differ": differ, "passed": tensors > 0 and differ == 0}


def signatures(export_report: dict) -> dict[str, dict]:
    """Per exported component: its inputs (name, dtype, shape with dynamic axes named) and outputs."""
    result = {}
    for component, entry in export_report["components"].items():
        inputs = []
        for item in entry["inputs"]:
            names = {int(axis): name for axis, name in item["dynamic_axes"].items()}  # str keys once read from JSON
            shape = [names.get(axis, size) for axis, size in enumerate(item["shape"])]
            inputs.append({"name": item["name"], "dtype": item["dtype"], "shape": shape})
        result[component] = {"inputs": inputs, "outputs": entry["outputs"]}
    return result


def variants(export_report: dict) -> dict[str, dict]:
    """Per runtime and precision the export holds: whether it is kept, its estimated request time and, for
    bf16/int8, its fidelity against fp32 (image PSNR, audio spectral convergence, per-component errors)."""
    result = {}
    for name, entry in export_report.get("variants", {}).items():
        summary = {key: entry[key] for key in ("runtime", "precision", "shipped", "reason", "psnr_db", "min_psnr_db",
                                                "spectral_convergence") if key in entry}
        if "timing" in entry:
            summary["estimated_request_s"] = entry["timing"]["estimated_request_s"]
        errors = {component: part["precisions"][name] for component, part in export_report["components"].items()
                  if name in part.get("precisions", {})}
        if errors:
            summary["components"] = errors
        result[name] = summary
    return result


def export_checks(export_report: dict) -> list[dict]:
    """The export's validation, worst case per component and runtime."""
    checks = []
    for component, entry in export_report["components"].items():
        by_runtime: dict[str, list[dict]] = {}
        for check in entry["validation"]:
            by_runtime.setdefault(check["runtime"], []).append(check)
        for runtime, runs in by_runtime.items():
            checks.append({
                "component": component,
                "runtime": runtime,
                "max_abs": max(run["max_abs"] for run in runs),
                "tolerance": entry["tolerance"],
                "passed": all(run["passed"] for run in runs),
                "detail": "worst of " + "; ".join(run["where"] for run in runs),
            })
    return checks


def _without_local_paths(conversion_report: Path, export_report: Path, source: Path, library: Path) -> None:
    """The reports go out with the release: their paths on this machine become paths inside the source
    (or the release), as the manifest names them."""
    source, library = Path(source).resolve(), Path(library).resolve()

    def relative(value):
        if isinstance(value, dict):
            return {key: relative(item) for key, item in value.items()}
        if isinstance(value, list):
            return [relative(item) for item in value]
        if isinstance(value, str) and Path(value).is_absolute():
            path = Path(value).resolve()
            for root, name in ((library, "."), (source, source.name)):
                if path == root or root in path.parents:
                    return (Path(name) / path.relative_to(root)).as_posix()
            return path.name
        return value

    for path in (conversion_report, export_report):
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(relative(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_seed_images(source: Path | None, folder: Path) -> dict:
    """riffusion-app's seed images and masks from the source's seed_images/ when it has them (byte for
    byte); otherwise riffusion-paddle's synthesized ones (the built-in random-weight models have none)."""
    from riffusion.seed_images import FOLDER, mask_ids, seed_ids

    shipped = sorted(source.joinpath(SEED_FOLDER).glob("*.png")) if source is not None else []
    shipped = [plain_file(path, model_root(source)) for path in shipped]
    folder.mkdir()
    for path in shipped or sorted(FOLDER.glob("*.png")):
        shutil.copyfile(path, folder / path.name)
    return {"folder": SEED_FOLDER, "origin": "source" if shipped else "synthesized", "seeds": seed_ids(folder),
            "masks": mask_ids(folder)}


def _library_parts(library: Path) -> list[str]:
    index = json.loads((library / "model_index.json").read_text(encoding="utf-8"))
    return [name for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None]


def _step(quiet: bool, what: str) -> None:
    if not quiet:
        print(f"release: {what}", file=sys.stderr, flush=True)
