"""python -m convert.lora: carry LoRA adapters between torch (diffusers / peft, kohya / A1111) and Paddle.

Reads, from a .safetensors or .bin file (never running a pickle's code) or a folder holding one:
- Paddle: what riffusion.train writes (`unet.<module>.lora.down.weight`, metadata format "pd");
- diffusers / peft: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>.lora_A...`;
- older diffusers: `unet.<attn>.processor.to_q_lora.down.weight` (with or without `unet.`), and
  `<module>.lora.down.weight` / `<module>.lora_linear_layer.down.weight` in torch layout;
- kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_...`, LoCon convolutions (a k x k down, a 1 x 1 up).
Every adapter is matched to a layer of the SD 1.x base (--base LIB, else the built-in SD 1.x shapes) and its
shapes checked; alpha / rank is folded into `up`. Writes (--to) Paddle (`paddle_lora_weights.safetensors`,
what `python -m riffusion --lora` and ppdiffusers read), diffusers (`pytorch_lora_weights.safetensors`, peft
keys, what diffusers' load_lora_weights reads) or kohya (`lora_kohya.safetensors`, alpha = rank). --fuse
writes a copy of --base with the LoRA merged into its weights. `lora_report.json` lists every source tensor
and what became of it. Bad input: one line naming the tensor, exit 1, nothing at --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from riffusion.console import add_version, command, quiet_third_party
from riffusion.files import atomic_folder
from riffusion.lora import LORA_FILE

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
REPORT_FILE = "lora_report.json"
COMPONENTS = ("unet", "text_encoder")
WEIGHT_FILES = {"unet": "unet/diffusion_paddle_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# Cross-attention key/value input width tells the model family apart.
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass
class Adapter:
    """One layer's LoRA in torch layout: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    sources: tuple = ()

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def folded_up(self) -> np.ndarray:
        if self.alpha is None or self.alpha == self.rank:
            return self.up
        return (self.up * np.float32(self.alpha / self.rank)).astype(self.up.dtype)


# Base model: layer name -> torch-layout weight shape, per component.

def base_shapes(base: Path | None) -> dict[str, dict[str, tuple]]:
    if base is not None:
        return _library_shapes(Path(base))
    return _builtin_shapes()


def _library_shapes(base: Path) -> dict[str, dict[str, tuple]]:
    from safetensors import safe_open

    shapes = {}
    for component, name in WEIGHT_FILES.items():
        path = base / name
        if not path.is_file():
            raise ConversionError(f"{base}: not a converted library (no {name})")
        with safe_open(str(path), framework="np") as handle:
            table = {}
            for key in handle.keys():
                if not key.endswith(".weight"):
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if len(shape) == 2 and "embed" not in key:
                    table[key[: -len(".weight")]] = shape[::-1]  # Paddle [in, out] -> torch [out, in]
                elif len(shape) == 4:
                    table[key[: -len(".weight")]] = shape
        shapes[component] = table
    return shapes


def _builtin_shapes() -> dict[str, dict[str, tuple]]:
    """Real SD 1.x shapes from convert.builtin's configs, built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from convert.builtin import text_config, unet_config

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(unet_config("full")),
                  "text_encoder": CLIPTextModel(text_config("full"))}
    shapes = {}
    for component, model in models.items():
        shapes[component] = {name: tuple(module.weight.shape) for name, module in model.named_modules()
                             if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    return shapes


# Reading.

def source_file(src: Path) -> Path:
    src = Path(src)
    if src.is_dir():
        for name in (LORA_FILE, DIFFUSERS_FILE, "pytorch_lora_weights.bin", KOHYA_FILE):
            if (src / name).is_file():
                return src / name
        candidates = sorted(path for path in src.iterdir() if path.suffix in (".safetensors", ".bin"))
        if len(candidates) != 1:
            raise ConversionError(f"{src}: expected one LoRA .safetensors or .bin file, found {len(candidates)}")
        return candidates[0]
    if not src.is_file():
        raise ConversionError(f"{src}: no such file or folder")
    if src.suffix not in (".safetensors", ".bin"):
        raise ConversionError(f"{src}: not a .safetensors or .bin file")
    return src


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """(name -> float32 array, is_paddle_layout) of a LoRA file."""
    from convert.tensorfile import TensorFile

    paddle_layout = False
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as handle:
                paddle_layout = (handle.metadata() or {}).get("format") == "pd"
        except Exception:  # TensorFile below names the problem
            pass
    file = TensorFile(path)
    try:
        tensors = {}
        for name in file.shapes:
            tensor = file.read(name)
            if not tensor.is_floating_point():
                raise ConversionError(f"{path}: tensor {name} is {tensor.dtype}, not floating point")
            array = tensor.float().numpy().copy()
            if not np.isfinite(array).all():
                raise ConversionError(f"{path}: tensor {name} holds NaN or infinite values")
            tensors[name] = array
    finally:
        file.close()
    if not tensors:
        raise ConversionError(f"{path}: holds no tensors")
    return tensors, paddle_layout


def _kohya_lookup(shapes: dict) -> dict[str, tuple[str, str]]:
    lookup = {}
    for prefix, component in KOHYA_PREFIXES.items():
        for name in shapes[component]:
            lookup[prefix + name.replace(".", "_")] = (component, name)
    return lookup


def parse(tensors: dict[str, np.ndarray], paddle_layout: bool, shapes: dict, path: Path) -> dict[tuple, Adapter]:
    """(component, layer) -> Adapter, every tensor accounted for."""
    adapters: dict[tuple, Adapter] = {}
    kohya = None

    def slot(component, layer, source) -> Adapter:
        adapter = adapters.setdefault((component, layer), Adapter())
        adapter.sources += (source,)
        return adapter

    for key, value in tensors.items():
        if key.startswith(("lora_te1_", "lora_te2_")) or key.startswith("lora_unet_input_blocks") \
                or key.startswith(("lora_unet_output_blocks", "lora_unet_middle_block")):
            raise ConversionError(f"{path}: {key} is an SDXL LoRA tensor (SDXL names); the base is SD 1.x")
        if key.startswith(tuple(KOHYA_PREFIXES)):
            kohya = kohya or _kohya_lookup(shapes)
            module, _, rest = key.partition(".")
            if module not in kohya:
                raise ConversionError(f"{path}: {key} names no layer of an SD 1.x UNet or text encoder")
            component, layer = kohya[module]
            adapter = slot(component, layer, key)
            if rest == "alpha":
                adapter.alpha = float(value.reshape(-1)[0])
            elif rest in ("lora_down.weight", "lora_up.weight"):
                setattr(adapter, "down" if "down" in rest else "up", value)
            else:
                raise ConversionError(f"{path}: {key}: unknown kohya tensor kind {rest!r} (LoHa / LoKr are not supported)")
            continue
        component, _, name = key.partition(".")
        if component not in COMPONENTS:
            component, name = "unet", key  # the oldest diffusers files have no "unet." prefix
        for marker, kind, transpose in ((".lora_A.weight", "down", False), (".lora_B.weight", "up", False),
                                        (".lora.down.weight", "down", paddle_layout),
                                        (".lora.up.weight", "up", paddle_layout),
                                        (".lora_linear_layer.down.weight", "down", paddle_layout),
                                        (".lora_linear_layer.up.weight", "up", paddle_layout)):
            if name.endswith(marker):
                layer = name[: -len(marker)]
                break
        else:
            legacy = _legacy_processor(name)
            if legacy is None:
                raise ConversionError(f"{path}: {key}: unknown LoRA key layout")
            layer, kind, transpose = legacy + (False,)
        if transpose and value.ndim == 2:
            value = np.ascontiguousarray(value.T)
        setattr(slot(component, layer, key), kind, value)
    for (component, layer), adapter in adapters.items():
        _check(component, layer, adapter, shapes, path)
    return adapters


def _legacy_processor(name: str):
    """`<attn>.processor.to_q_lora.down.weight` -> (`<attn>.to_q`, "down")."""
    parts = name.split(".")
    if len(parts) < 4 or parts[-4] != "processor" or parts[-1] != "weight" or parts[-2] not in ("down", "up"):
        return None
    projection = parts[-3].removesuffix("_lora")
    projection = "to_out.0" if projection == "to_out" else projection
    return ".".join(parts[:-4] + [projection]), parts[-2]


def _check(component: str, layer: str, adapter: Adapter, shapes: dict, path: Path) -> None:
    what = f"{path}: {adapter.sources[0]}"
    if adapter.down is None or adapter.up is None:
        raise ConversionError(f"{what}: {component}.{layer} needs both a down and an up tensor")
    expected = shapes[component].get(layer)
    if expected is None:
        raise ConversionError(f"{what}: {component}.{layer} is not a layer of the base model")
    down, up = adapter.down, adapter.up
    rank = down.shape[0]
    if up.ndim == 4:
        up_ok = up.shape[2:] == (1, 1)
        up = up.reshape(up.shape[:2])
    else:
        up_ok = True
    in_shape = (expected[1],) + tuple(expected[2:])
    fits = up_ok and up.ndim == 2 and up.shape == (expected[0], rank) and tuple(down.shape[1:]) == in_shape
    if not fits:
        family = ""
        if layer.endswith(("attn2.to_k", "attn2.to_v")) and down.ndim == 2 and down.shape[1] in FAMILIES \
                and down.shape[1] != expected[1]:
            family = f" (a LoRA for {FAMILIES[down.shape[1]]}: cross-attention width {down.shape[1]}, the base has {expected[1]})"
        raise ConversionError(f"{what}: down {list(adapter.down.shape)} / up {list(adapter.up.shape)} do not fit "
                              f"{component}.{layer} with weight {list(expected)}{family}")
    if adapter.alpha is not None and not (np.isfinite(adapter.alpha) and adapter.alpha > 0):
        raise ConversionError(f"{what}: alpha {adapter.alpha} is not a positive number")


# Writing.

def render(adapters: dict[tuple, Adapter], to: str) -> tuple[str, dict[str, np.ndarray], dict[str, str], dict]:
    """(file name, tensors, metadata, source key -> written keys)."""
    tensors, written = {}, {}
    for (component, layer), adapter in sorted(adapters.items()):
        down, up = adapter.down, adapter.folded_up()
        if to == "paddle":
            linear = down.ndim == 2
            marker = ".lora." if component == "unet" else ".lora_linear_layer."
            keys = {f"{component}.{layer}{marker}down.weight": down.T if linear else down,
                    f"{component}.{layer}{marker}up.weight": up.T if linear else up}
        elif to == "diffusers":
            keys = {f"{component}.{layer}.lora_A.weight": down, f"{component}.{layer}.lora_B.weight": up}
        else:
            module = {v: k for k, v in KOHYA_PREFIXES.items()}[component] + layer.replace(".", "_")
            keys = {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                    f"{module}.alpha": np.array(float(adapter.rank), dtype=np.float32)}
        keys = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in keys.items()}
        tensors.update(keys)
        for source in adapter.sources:
            written[source] = sorted(keys)
    name = {"paddle": LORA_FILE, "diffusers": DIFFUSERS_FILE, "kohya": KOHYA_FILE}[to]
    metadata = {"format": "pd" if to == "paddle" else "pt"}
    return name, tensors, metadata, written


def fuse_into(base: Path, staging: Path, adapters: dict[tuple, Adapter], scale: float) -> None:
    """A copy of the library `base` with W += scale * up @ down in each adapted layer (float32)."""
    from safetensors.numpy import load_file, save_file

    for entry in base.iterdir():
        target = staging / entry.name
        shutil.copytree(entry, target) if entry.is_dir() else shutil.copy2(entry, target)
    for component, name in WEIGHT_FILES.items():
        mine = {layer: adapter for (part, layer), adapter in adapters.items() if part == component}
        if not mine:
            continue
        from safetensors import safe_open

        with safe_open(str(base / name), framework="np") as handle:
            metadata = handle.metadata()  # "pd" for ppdiffusers, "np" for paddlenlp's CLIP: keep what loads
        weights = load_file(str(base / name))
        for layer, adapter in mine.items():
            key = f"{layer}.weight"
            weight = weights[key]
            up, down = adapter.folded_up(), adapter.down
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            if weight.ndim == 2:
                delta = delta.T  # Paddle [in, out]
            weights[key] = (weight.astype(np.float32) + np.float32(scale) * delta.reshape(weight.shape)).astype(weight.dtype)
        save_file(weights, str(staging / name), metadata=metadata)


def convert(src: Path, out: Path, to: str = "paddle", base: Path | None = None, fuse: bool = False,
            scale: float = 1.0, overwrite: bool = False, parity_torch: Path | None = None) -> dict:
    """Convert (or fuse) and return the report; ConversionError with nothing written on bad input (or a
    failed parity check, with `parity_torch`: the torch diffusers repo --base was converted from)."""
    if (fuse or parity_torch is not None) and base is None:
        raise ConversionError("--fuse and --parity need --base LIB (the library the LoRA is for)")
    if fuse and parity_torch is not None:
        raise ConversionError("--parity checks the LoRA itself, not a fused library: run it without --fuse")
    if not np.isfinite(scale):
        raise ConversionError(f"--scale must be a finite number, got {scale}")
    path = source_file(src)
    tensors, paddle_layout = read_tensors(path)
    shapes = base_shapes(base)
    adapters = parse(tensors, paddle_layout, shapes, path)
    with atomic_folder(out, overwrite) as staging:
        if fuse:
            fuse_into(Path(base), staging, adapters, scale)
            written = {source: [f"{component}.{layer}.weight (fused at scale {scale})"]
                       for (component, layer), adapter in adapters.items() for source in adapter.sources}
            output = "library"
        else:
            from safetensors.numpy import save_file

            output, rendered, metadata, written = render(adapters, to)
            save_file(rendered, str(staging / output), metadata=metadata)
        report = {"source": str(path), "to": "fused library" if fuse else to, "output": output,
                  "adapters": len(adapters), "rank": sorted({adapter.rank for adapter in adapters.values()}),
                  "tensors": {key: written[key] for key in tensors}}
        if parity_torch is not None:
            from convert.lora_parity import LoRA, lora_checks
            from convert.parity import to_json

            checks = lora_checks(LoRA(path, adapters, paddle_layout, shapes), Path(parity_torch), Path(base))
            report["parity"] = to_json(checks, {"torch": str(parity_torch), "base": str(base)})
            if not report["parity"]["passed"]:
                failed = ", ".join(check.name for check in checks if not check.passed)
                raise ConversionError(f"parity failed ({failed}): nothing written")
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.lora", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_version(p)
    p.add_argument("--src", type=Path, required=True, help="a LoRA .safetensors / .bin file, or a folder holding one")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--to", choices=("paddle", "diffusers", "kohya"), default="paddle")
    p.add_argument("--base", type=Path, help="the converted library the LoRA is for (default: SD 1.x shapes)")
    p.add_argument("--fuse", action="store_true", help="write a copy of --base with the LoRA merged in")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength for --fuse (default 1)")
    p.add_argument("--parity", type=Path, metavar="TORCH_REPO",
                   help="check the LoRA in Paddle against diffusers + peft on this torch repo (the one --base was "
                        "converted from) at scales 0.5 and 1.0, max abs <= 1e-4, and its round trip through torch "
                        "layouts (the checks of python -m convert.parity --lora)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    report = convert(args.src, args.out, args.to, args.base, args.fuse, args.scale, args.overwrite, args.parity)
    if "parity" in report:
        from convert.parity import Check, format_table

        print(format_table([Check(**check) for check in report["parity"]["checks"]]))
    print(f"wrote {args.out}/{report['output']}: {report['adapters']} adapters (rank {report['rank']}) from "
          f"{len(report['tensors'])} tensors of {report['source']}; report in {args.out}/{REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
