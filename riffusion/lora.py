"""LoRA on ppdiffusers without its PEFT backend: add trainable adapters, save them in ppdiffusers' own
LoRA file layout, and apply a saved file to a pipeline.

Why this route (tried on Paddle 3.3.1 and ppdiffusers 0.29): ppdiffusers 0.29's PEFT layer fails on Paddle 3.3.1 and paddlenlp's
LoRAModel refuses a ppdiffusers UNet; the UNet's `LoRACompatibleLinear` / `LoRACompatibleConv` layers with
`set_lora_layer` train and load fine. ppdiffusers' own text-encoder LoRA loading and `pipe.fuse_lora` call
`deprecate(..., "0.25")`, which raises on ppdiffusers >= 0.25, so the text encoder is patched here with
ppdiffusers' `PatchedLoraProjection` directly.

File layout (`paddle_lora_weights.safetensors`, metadata format "pd", Paddle [in, out] linear layout):
`unet.<module>.lora.down.weight` [in, rank] / `.lora.up.weight` [rank, out] (convolutions keep the conv
layout), `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`. `pipe.load_lora_weights(DIR)`
and `pipe.unet.load_attn_procs(DIR)` read the UNet part as is. alpha / rank is folded into `up`, so the
file needs no alpha entries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from riffusion.errors import InputError

LORA_FILE = "paddle_lora_weights.safetensors"  # ppdiffusers' PADDLE_LORA_WEIGHT_NAME_SAFE
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, attn1 and attn2
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # what ppdiffusers patches in the text encoder


def _matches(name: str, targets) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def _initialise(layer, rank: int, rng: np.random.Generator) -> None:
    """down ~ N(0, 1/rank) as ppdiffusers does, up = 0, but from our seeded generator so every process and
    every resumed run starts from the same adapter."""
    down = layer.down.weight
    down.set_value(rng.normal(0.0, 1.0 / rank, size=down.shape).astype(np.float32))
    layer.up.weight.set_value(np.zeros(layer.up.weight.shape, dtype=np.float32))


def add_unet_lora(unet, rank: int, alpha: float, targets=UNET_TARGETS, seed: int = 0) -> dict:
    """Attach LoRA layers to the UNet's LoRA-compatible layers named by `targets` (suffixes of module
    names); returns {module name: lora layer}."""
    from ppdiffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear, LoRAConv2dLayer, LoRALinearLayer

    rng = np.random.default_rng([seed, 7])
    layers = {}
    for name, module in unet.named_sublayers():
        if not _matches(name, targets):
            continue
        if isinstance(module, LoRACompatibleLinear):
            lora = LoRALinearLayer(module.weight.shape[0], module.weight.shape[1], rank, alpha)
        elif isinstance(module, LoRACompatibleConv):
            lora = LoRAConv2dLayer(module._in_channels, module._out_channels, rank, module._kernel_size,
                                   module._stride, module._padding, alpha)
        else:
            raise InputError(f"LoRA target {name} is a {type(module).__name__}, not a LoRA-compatible layer")
        _initialise(lora, rank, rng)
        module.set_lora_layer(lora)
        layers[name] = lora
    if not layers:
        raise InputError(f"no UNet layer matches the LoRA targets {', '.join(targets)}")
    return layers


def add_text_encoder_lora(text_encoder, rank: int, alpha: float, seed: int = 0) -> dict:
    """Wrap the text encoder's attention projections in ppdiffusers' PatchedLoraProjection."""
    from ppdiffusers.models.lora import PatchedLoraProjection, text_encoder_attn_modules

    rng = np.random.default_rng([seed, 11])
    layers = {}
    for name, attention in text_encoder_attn_modules(text_encoder):
        for target in TEXT_TARGETS:
            patched = PatchedLoraProjection(getattr(attention, target), 1.0, alpha, rank)
            _initialise(patched.lora_linear_layer, rank, rng)
            setattr(attention, target, patched)
            layers[f"{name}.{target}"] = patched.lora_linear_layer
    return layers


def folded(layer) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) of a LoRA layer with alpha / rank folded into up."""
    down, up = layer.down.weight.numpy(), layer.up.weight.numpy()
    if layer.network_alpha is not None and layer.network_alpha != layer.rank:
        up = up * np.float32(layer.network_alpha / layer.rank)
    return down, up


def state_dict(unet_layers: dict, text_layers: dict) -> dict[str, np.ndarray]:
    """The LoRA file's tensors (see the module docstring)."""
    tensors = {}
    for name, layer in unet_layers.items():
        tensors[f"unet.{name}.lora.down.weight"], tensors[f"unet.{name}.lora.up.weight"] = folded(layer)
    for name, layer in text_layers.items():
        down, up = folded(layer)
        tensors[f"text_encoder.{name}.lora_linear_layer.down.weight"] = down
        tensors[f"text_encoder.{name}.lora_linear_layer.up.weight"] = up
    return tensors


def save(tensors: dict[str, np.ndarray], folder: Path) -> Path:
    """Write LORA_FILE into folder atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    path = folder / LORA_FILE
    partial = folder / f".{LORA_FILE}.partial"
    save_file({key: np.ascontiguousarray(value) for key, value in tensors.items()}, str(partial),
              metadata={"format": "pd"})
    partial.replace(path)
    return path


def read(path: Path) -> dict[str, np.ndarray]:
    """A LoRA file (or a folder holding LORA_FILE) in this layout; InputError naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no {LORA_FILE} (train one with python -m riffusion.train, or convert a torch "
                         "LoRA with python -m convert.lora)")
    try:
        with safe_open(str(file), framework="np") as handle:
            if (handle.metadata() or {}).get("format") != "pd":
                raise InputError(f"{file}: not a Paddle LoRA file (metadata format is not 'pd'); "
                                 "convert it with python -m convert.lora")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise InputError(f"{file}: not a readable safetensors file ({error})") from None
    for key, value in tensors.items():
        if not (key.startswith("unet.") and key.endswith((".lora.down.weight", ".lora.up.weight"))
                or key.startswith("text_encoder.") and key.endswith(
                    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))):
            raise InputError(f"{file}: unexpected tensor {key}")
        if not np.isfinite(value).all():
            raise InputError(f"{file}: tensor {key} holds NaN or infinite values")
    return tensors


def apply(pipe, path: Path, scale: float = 1.0) -> None:
    """Load a LoRA into a ppdiffusers pipeline and fuse it at `scale` (0 gives the base weights exactly)."""
    import math

    if not math.isfinite(scale):
        raise InputError(f"LoRA scale must be a finite number, got {scale}")
    apply_tensors(pipe, read(path), scale, path)


def apply_tensors(pipe, tensors: dict[str, np.ndarray], scale: float = 1.0, path="LoRA") -> None:
    """apply() for tensors already in memory (this module's file layout)."""
    import paddle

    unet_part = {key[len("unet."):]: paddle.to_tensor(value) for key, value in tensors.items() if key.startswith("unet.")}
    text_part = {key[len("text_encoder."):]: value for key, value in tensors.items() if key.startswith("text_encoder.")}
    if unet_part:
        _check_shapes(pipe.unet, unet_part, ".lora.", path)
        pipe.unet.load_attn_procs(unet_part, from_diffusers=False)
        pipe.unet.fuse_lora(lora_scale=scale)
    if text_part:
        _apply_text_encoder(pipe.text_encoder, text_part, scale, path)


def _check_shapes(model, part: dict, marker: str, path) -> None:
    modules = dict(model.named_sublayers())
    for key, value in part.items():
        module_name, kind = key.split(marker)[0], key.rsplit(".", 2)[-2]
        module = modules.get(module_name)
        if module is None:
            raise InputError(f"{path}: {key} names no layer of the model")
        weight = module.weight.shape
        if len(weight) == 2:
            fits = value.shape[0] == weight[0] if kind == "down" else value.shape[1] == weight[1]
        else:
            fits = value.shape[1] == weight[1] if kind == "down" else value.shape[0] == weight[0]
        if not fits:
            raise InputError(f"{path}: {key} has shape {list(value.shape)}, which does not fit the layer's "
                             f"weight {list(weight)}")


def _apply_text_encoder(text_encoder, part: dict, scale: float, path) -> None:
    """Fuse into the projections' weights, as ppdiffusers' PatchedLoraProjection._fuse_lora computes it."""
    modules = dict(text_encoder.named_sublayers())
    for name in sorted({key.split(".lora_linear_layer.")[0] for key in part}):
        linear = modules.get(name)
        down, up = part.get(f"{name}.lora_linear_layer.down.weight"), part.get(f"{name}.lora_linear_layer.up.weight")
        if linear is None or not hasattr(linear, "weight"):
            raise InputError(f"{path}: text_encoder.{name} names no layer of the text encoder")
        if down is None or up is None:
            raise InputError(f"{path}: text_encoder.{name} needs both down and up weights")
        weight = linear.weight.numpy()
        if down.shape[0] != weight.shape[0] or up.shape[1] != weight.shape[1] or down.shape[1] != up.shape[0]:
            raise InputError(f"{path}: text_encoder.{name} LoRA shapes {list(down.shape)} / {list(up.shape)} do "
                             f"not fit the layer's weight {list(weight.shape)}")
        fused = weight.astype(np.float32) + np.float32(scale) * (down.astype(np.float32) @ up.astype(np.float32))
        linear.weight.set_value(fused.astype(weight.dtype))
