"""The release's README.md: MODEL_CARD.md (string.Template placeholders) filled in from the manifest."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from string import Template

from convert.errors import ConversionError

TEMPLATE = files("convert.release") / "MODEL_CARD.md"  # package data: shipped in the wheel
RUNTIME_NAMES = {"": "Paddle dynamic", "static": "Paddle Inference", "onnx": "onnxruntime"}


def render_card(manifest: dict, template=TEMPLATE) -> str:
    try:
        text = template.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversionError(f"{template}: the model card template is missing (a broken install: reinstall "
                              f"riffusion-paddle)") from None
    artefacts = manifest["artefacts"]
    values = {
        "name": manifest["name"],
        "repo_id": manifest["repo_id"],
        "source": _source(manifest["source"]),
        "tool_version": manifest["versions"].get("riffusion-paddle", "?"),
        "created": manifest["created"][:10],
        "dtype": manifest["dtype"],
        "single_file": artefacts["single_file"]["file"],
        "single_file_config": artefacts["single_file"]["config"],
        "export_folder": artefacts["export"]["folder"],
        "seed_folder": artefacts["seed_images"]["folder"],
        "artefacts_table": artefacts_table(manifest),
        "signatures_table": signatures_table(artefacts["export"]["signatures"]),
        "parity_table": parity_table(manifest["parity"]),
        "versions_table": _table(["package", "version"], [[name, f"`{v}`"] for name, v in manifest["versions"].items()]),
    }
    try:
        return Template(text).substitute(values)
    except (KeyError, ValueError) as error:
        raise ConversionError(f"{template}: unknown or malformed placeholder ({error})") from None


def artefacts_table(manifest: dict) -> str:
    artefacts, files = manifest["artefacts"], manifest["files"]
    single, export, seeds = artefacts["single_file"], artefacts["export"], artefacts["seed_images"]

    def size(names) -> str:
        return _gigabytes(sum(files[name]["bytes"] for name in names))

    export_files = [name for name in files if name.startswith(export["folder"] + "/")]
    onnx_files = [name for name in export_files if "/model.onnx" in name]
    seed_files = [name for name in files if name.startswith(seeds["folder"] + "/")]
    single_files = [single["file"], single["config"]]
    others = set(export_files + seed_files + single_files + [artefacts["model_card"]])
    library_files = [name for name in files if name not in others]
    components = ", ".join(export["components"])
    rows = [
        ["ppdiffusers library: " + ", ".join(artefacts["library"]["parts"]), "`model_index.json`, `<part>/`",
         size(library_files)],
        ["compiled single file, original LDM layout, and its config", f"`{single['file']}`, `{single['config']}`",
         size(single_files)],
        [f"static graph for Paddle Inference: {components}",
         f"`{export['folder']}/<component>/inference.json` + `.pdiparams`", size(set(export_files) - set(onnx_files))],
    ]
    if onnx_files:
        rows.append([f"ONNX: {components}", f"`{export['folder']}/<component>/model.onnx`", size(onnx_files)])
    rows.append([f"seed images for riffusion-app: {len(seeds['seeds'])} seeds, {len(seeds['masks'])} masks",
                 f"`{seeds['folder']}/*.png`", size(seed_files)])
    return _table(["what", "files", "size"], rows)


def signatures_table(signatures: dict) -> str:
    rows = []
    for component, signature in signatures.items():
        inputs = ", ".join(f"`{item['name']}` {item['dtype']} [{', '.join(map(str, item['shape']))}]"
                           for item in signature["inputs"])
        rows.append([f"`{component}`", inputs, ", ".join(f"`{name}`" for name in signature["outputs"])])
    return _table(["program", "inputs", "outputs"], rows)


def parity_table(parity: dict) -> str:
    rows = []
    library = parity["library"]
    if library.get("checks"):
        for check in library["checks"]:
            runtime = RUNTIME_NAMES[check["name"].partition("[")[2].rstrip("]")]
            rows.append([f"`{check['name']}`", f"{runtime} vs torch", check["detail"], _error(check["max_abs"]),
                         _tolerance(check["tolerance"]), _result(check["passed"])])
    else:
        rows.append(["library vs torch", "-", f"not run: {library.get('reason', 'no torch source')}", "-", "-", "-"])
    single = parity["single_file"]
    rows.append(["`single_file`", "library", f"read back into the library layout: {single['tensors']} tensors, "
                 f"{single['differ']} differ", "0 (bitwise)" if single["differ"] == 0 else "differs", "exact",
                 _result(single["passed"])])
    for check in parity["export"]:
        rows.append([f"`{check['component']}[{check['runtime']}]`", f"{RUNTIME_NAMES[check['runtime']]} vs Paddle dynamic",
                     check["detail"], _error(check["max_abs"]), _tolerance(check["tolerance"]), _result(check["passed"])])
    return _table(["check", "compared", "what", "max abs error", "tolerance", "result"], rows)


def _source(source: dict) -> str:
    if source["kind"] == "hub":
        return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}) (revision `{source['revision']}`)"
    return f"the {source['kind'].replace('_', ' ')} `{Path(source['path']).name}`"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _error(value: float) -> str:
    return f"{value:.2e}"


def _tolerance(value: float) -> str:
    return "exact" if value == 0 else f"{value:.0e}"


def _result(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
