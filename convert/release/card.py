"""The release's README.md: MODEL_CARD.md (string.Template placeholders) filled in from the manifest."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from string import Template

from convert.errors import ConversionError

TEMPLATE = files("convert.release") / "MODEL_CARD.md"  # package data: shipped in the wheel
RUNTIME_NAMES = {"": "Paddle dynamic", "static": "Paddle Inference", "onnx": "onnxruntime"}


def render_card(manifest: dict, template=TEMPLATE) -> str:
    """Every sentence, section and snippet from what the release holds and what was checked."""
    try:
        text = template.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversionError(f"{template}: the model card template is missing (a broken install: reinstall "
                              f"riffusion-paddle)") from None
    artefacts = manifest["artefacts"]
    export = artefacts["export"]
    library_checked = bool(manifest["parity"]["library"].get("checks"))
    values = {
        "front_matter": front_matter(manifest),
        "checked": ("each piece checked number by number against the PyTorch original by riffusion-paddle, the "
                    "toolkit that converted it" if library_checked else
                    "converted by riffusion-paddle; parity against the PyTorch original was not run for this release "
                    f"({manifest['parity']['library'].get('reason', 'no torch source')}), the checks that ran are "
                    "listed under Parity"),
        "name": manifest["name"],
        "repo_id": manifest["repo_id"],
        "source": _source(manifest["source"]),
        "tool_version": manifest["versions"].get("riffusion-paddle", "?"),
        "created": manifest["created"][:10],
        "dtype": manifest["dtype"],
        "single_file": artefacts["single_file"]["file"],
        "single_file_config": artefacts["single_file"]["config"],
        "export_folder": export["folder"],
        "export_components": ", ".join(export["components"]) + (", Paddle Inference and ONNX" if export["onnx"]
                                                                 else ", Paddle Inference only"),
        "seed_folder": artefacts["seed_images"]["folder"],
        "seed_origin": _seed_origin(artefacts["seed_images"]),
        "unet_inputs": unet_inputs(export["signatures"]["unet"]),
        "pipeline_parts": ", ".join(f'{part}="static"' for part in pipeline_parts(export["components"])),
        "onnx_section": onnx_section(export["folder"]) if export["onnx"] else "",
        "artefacts_table": artefacts_table(manifest),
        "signatures_table": signatures_table(export["signatures"], export["onnx"]),
        "parity_intro": _parity_intro(library_checked, export["onnx"]),
        "parity_table": parity_table(manifest["parity"]),
        "precisions_table": precisions_table(export.get("variants", {})),
        "versions_table": _table(["package", "version"], [[name, f"`{v}`"] for name, v in manifest["versions"].items()]),
    }
    try:
        return Template(text).substitute(values)
    except (KeyError, ValueError) as error:
        raise ConversionError(f"{template}: unknown or malformed placeholder ({error})") from None


def front_matter(manifest: dict) -> str:
    """The Hub's YAML header: base_model only when the source is a Hub repo, the onnx tag only with ONNX files."""
    lines = ["license: creativeml-openrail-m", "library_name: ppdiffusers"]
    if manifest["source"]["kind"] == "hub":
        lines.append(f"base_model: {manifest['source']['repo_id']}")
    lines += ["pipeline_tag: text-to-image", "tags:"]
    tags = ["paddlepaddle", "ppdiffusers", "stable-diffusion", "riffusion", "text-to-audio", "spectrogram", "music"]
    tags += ["onnx"] if manifest["artefacts"]["export"]["onnx"] else []
    return "\n".join(lines + [f"- {tag}" for tag in tags]) + "\n"


# Stand-ins for the named axes in the card's example inputs: a 512x512 image (64x64 latents), batch 2
# (the prompt and the empty prompt of classifier-free guidance), one timestep, CLIP's 77 tokens.
EXAMPLE_AXES = {"batch": 2, "steps": 1, "height": 64, "width": 64, "sequence": 77}


def unet_inputs(signature: dict) -> str:
    """Python that builds one input of each of the program's names, dtypes and shapes."""
    lines = ["rng = np.random.default_rng(0)", "inputs = {"]
    for item in signature["inputs"]:
        shape = tuple(EXAMPLE_AXES.get(axis, axis) if isinstance(axis, str) else axis for axis in item["shape"])
        if item["name"] == "timestep":
            value = f"np.full({shape}, 999, dtype=np.{item['dtype']})"
        else:
            value = f"rng.standard_normal({shape}).astype(np.{item['dtype']})"
        lines.append(f'    "{item["name"]}": {value},')
    return "\n".join(lines + ["}"])


def pipeline_parts(components: list[str]) -> list[str]:
    """The load_pipeline arguments the export can serve: the VAE needs both its halves."""
    parts = [part for part in ("unet", "text_encoder") if part in components]
    return parts + (["vae"] if {"vae_encoder", "vae_decoder"} <= set(components) else [])


def onnx_section(export_folder: str) -> str:
    return f"""
### onnxruntime

The same step with the ONNX program (`inputs` as above):

```python
import onnxruntime as ort

unet = ort.InferenceSession("{export_folder}/unet/model.onnx", providers=["CPUExecutionProvider"])
noise = unet.run(None, inputs)[0]
```
"""


def _parity_intro(library_checked: bool, onnx: bool) -> str:
    programs = "static and ONNX programs" if onnx else "static programs"
    if library_checked:
        return (f"Maximum absolute error (fp32) against the PyTorch original (diffusers / transformers) on the same "
                f"inputs, per component and end to end; the {programs} are also checked against the Paddle models "
                f"at two sizes each.")
    return (f"The library was not compared with the PyTorch original for this release (the first row says why); "
            f"the compiled single file was read back bitwise and the {programs} were checked against the Paddle "
            f"models at two sizes each. Maximum absolute error (fp32):")


def _seed_origin(seeds: dict) -> str:
    count = f"{len(seeds['seeds'])} seed images and {len(seeds['masks'])} masks"
    if seeds.get("origin") == "source":
        return f"riffusion-app's seed images and masks as the source repository ships them ({count})"
    return (f"seed images and masks synthesized by riffusion-paddle in the style of riffusion-app's ({count}): the "
            f"source has no `seed_images/`")


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


def signatures_table(signatures: dict, onnx: bool) -> str:
    rows = []
    for component, signature in signatures.items():
        inputs = ", ".join(f"`{item['name']}` {item['dtype']} [{', '.join(map(str, item['shape']))}]"
                           for item in signature["inputs"])
        # Paddle Inference names a program's outputs by position; the ONNX export gives them their meaning
        static = ", ".join(f"`fetch_name_{index}`" for index in range(len(signature["outputs"])))
        row = [f"`{component}`", inputs]
        row += [", ".join(f"`{name}`" for name in signature["outputs"])] if onnx else []
        rows.append(row + [static])
    header = ["program", "inputs"] + (["outputs (onnxruntime)"] if onnx else []) + ["outputs (Paddle Inference)"]
    return _table(header, rows)


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


def precisions_table(variants: dict) -> str:
    """The runtimes and precisions the export was timed in (the runtime runs the fastest kept one), with
    what bf16/int8 cost against fp32; empty when the export holds one variant only."""
    if not variants:
        return ""
    rows = []
    for name, entry in variants.items():
        errors = entry.get("components", {})
        worst = max((part["max_rel"] for part in errors.values()), default=None)
        rows.append([f"`{name}`", f"{entry['estimated_request_s']:.1f} s" if "estimated_request_s" in entry else "-",
                     f"{worst:.1e}" if worst is not None else "-",
                     f"{entry['psnr_db']:.1f} dB" if "psnr_db" in entry else "reference" if name == "static-fp32" else "-",
                     f"{entry['spectral_convergence']:.4f}" if "spectral_convergence" in entry else "-",
                     "yes" if entry["shipped"] else f"no: {entry.get('reason', '')}"])
    return ("Runtimes and precisions, each timed on one riffusion-app request when exported and compared with "
            "static fp32 from the same seeds:\n\n" + _table(
                ["variant", "request (estimated)", "max relative error", "image PSNR", "audio spectral convergence",
                 "kept"], rows))


def _source(source: dict) -> str:
    if source["kind"] == "hub":
        return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}) (revision `{source['revision']}`)"
    return f"the {source['kind'].replace('_', ' ')} `{source['name']}`"


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
