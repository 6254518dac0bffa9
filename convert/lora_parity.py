"""LoRA parity: a LoRA applied to a converted library in Paddle against diffusers + peft with the same LoRA on
the torch repo the library was made from, and the LoRA's Paddle -> torch -> Paddle round trip.

Run by `python -m convert.parity --lora FILE_OR_DIR` (after the library's own checks) and by
`python -m convert.lora --parity TORCH_REPO`. Rows, each at LoRA scales 0.5 and 1.0 (max abs <= TOLERANCE):
- `lora_unet@S`, `lora_text_encoder@S`: the LoRA merged into the weights, as `python -m riffusion --lora` runs it;
- `lora_unet_unfused@S`: the UNet with LoRA layers beside its weights (ppdiffusers' load_attn_procs);
- `lora_fused_unfused@S`: those two Paddle UNets against each other;
and `lora_round_trip[diffusers]`, `lora_round_trip[kohya]`: the Paddle tensors written in that torch layout and
read back, compared bit for bit.
The torch side reads a torch LoRA file itself (diffusers' own reader, not ours); a Paddle file (what
riffusion.train writes) is given to it in diffusers' layout.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.lora import DIFFUSERS_FILE, Adapter, base_shapes, parse, read_tensors, render, source_file
from convert.parity import Check, compare, quiet_libraries
from riffusion.console import native_stdout_silenced

TOLERANCE = 1e-4  # absolute, fp32: the UNet's tolerance in convert.parity
SCALES = (0.5, 1.0)
PROMPT = "a lo-fi beat with a warm bass"


@dataclass
class LoRA:
    """A LoRA file read and matched to a library's layers: bad input has been refused by then."""

    path: Path
    adapters: dict[tuple, Adapter]
    paddle_layout: bool
    shapes: dict


def read_lora(src: Path, library: Path) -> LoRA:
    """ConversionError, one line naming the file and tensor, for a missing or unreadable file or a LoRA made for
    another base (unknown layers, shapes that do not fit, SD 2.x / SDXL)."""
    path = source_file(Path(src))
    tensors, paddle_layout = read_tensors(path)
    shapes = base_shapes(Path(library))
    return LoRA(path, parse(tensors, paddle_layout, shapes, path), paddle_layout, shapes)


def lora_checks(lora: LoRA, torch_repo: Path, library: Path, latent: int | None = None,
                half_weights: bool = False, scales=SCALES) -> list[Check]:
    """`half_weights`: the library holds float16 weights, so the torch reference gets the same rounding."""
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="lora-parity-") as work:
        work = Path(work)
        torch_file = lora.path
        if lora.paddle_layout:
            torch_file = _write(lora.adapters, "diffusers", work / "diffusers")
        checks = _applied(lora, torch_file, Path(torch_repo), Path(library), latent, half_weights, scales)
        for layout in ("diffusers", "kohya"):
            checks.append(_round_trip(lora, layout, work / layout))
    return checks


def _write(adapters: dict, layout: str, folder: Path) -> Path:
    from safetensors.numpy import save_file

    name, tensors, metadata, _ = render(adapters, layout)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name), metadata=metadata)
    return folder / name


def _round_trip(lora: LoRA, layout: str, folder: Path) -> Check:
    start = render(lora.adapters, "paddle")[1]
    path = _write(lora.adapters, layout, folder)
    tensors, paddle_layout = read_tensors(path)
    back = render(parse(tensors, paddle_layout, lora.shapes, path), "paddle")[1]
    name = f"lora_round_trip[{layout}]"
    if set(back) != set(start):
        return Check(name, float("inf"), float("inf"), 0.0, False, f"{len(set(start) ^ set(back))} tensor names differ")
    differ = [key for key in start if start[key].dtype != back[key].dtype or start[key].shape != back[key].shape
              or start[key].tobytes() != back[key].tobytes()]
    check = compare(name, np.concatenate([start[key].ravel() for key in start]),
                    np.concatenate([back[key].ravel() for key in start]), 0.0)
    check.passed = not differ
    check.detail = f"Paddle -> {layout} -> Paddle, {len(start)} tensors, {len(differ)} differ bitwise"
    return check


def _applied(lora: LoRA, torch_file: Path, torch_repo: Path, library: Path, latent: int | None, half_weights: bool,
             scales) -> list[Check]:
    import paddle
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    from export.runtime import load_pipeline
    from riffusion import lora as paddle_lora

    tensors = render(lora.adapters, "paddle")[1]
    with native_stdout_silenced():  # the tokenizers library's "Ignored unknown kwarg option" lines
        reference = StableDiffusionPipeline.from_pretrained(str(torch_repo), safety_checker=None,
                                                            requires_safety_checker=False)
    if half_weights:
        for model in (reference.unet, reference.text_encoder):
            model.to(torch.float16).to(torch.float32)
    reference.load_lora_weights(str(torch_file.parent), weight_name=torch_file.name)
    config = reference.unet.config
    rng = np.random.default_rng(0)
    side = latent or min(int(config.sample_size), 32)
    sample = rng.standard_normal((1, config.in_channels, side, side)).astype(np.float32)
    context = rng.standard_normal((1, 77, config.cross_attention_dim)).astype(np.float32)
    ids = reference.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    unfused = load_pipeline(library)
    unet_part = {key[len("unet."):]: paddle.to_tensor(value) for key, value in tensors.items() if key.startswith("unet.")}
    if unet_part:
        unfused.unet.load_attn_procs(unet_part, from_diffusers=False)
    inputs = (paddle.to_tensor(sample), paddle.to_tensor([500]))
    what = f"batch 1, {side}x{side} latents"
    checks = []
    for scale in scales:
        with torch.no_grad():
            torch_unet = reference.unet(torch.from_numpy(sample), 500, encoder_hidden_states=torch.from_numpy(context),
                                        cross_attention_kwargs={"scale": scale}).sample.numpy()
            scale_lora_layers(reference.text_encoder, scale)
            torch_text = reference.text_encoder(torch.from_numpy(ids))[0].numpy()
            unscale_lora_layers(reference.text_encoder, scale)
        fused = load_pipeline(library)
        paddle_lora.apply_tensors(fused, tensors, scale)
        with paddle.no_grad():
            fused_unet = fused.unet(*inputs, encoder_hidden_states=paddle.to_tensor(context)).sample.numpy()
            unfused_unet = unfused.unet(*inputs, encoder_hidden_states=paddle.to_tensor(context),
                                        cross_attention_kwargs={"scale": scale}).sample.numpy()
            fused_text = fused.text_encoder(paddle.to_tensor(ids))[0].numpy()
        del fused
        checks += [
            compare(f"lora_unet@{scale:g}", torch_unet, fused_unet, TOLERANCE,
                    f"LoRA merged (as --lora runs it) vs diffusers + peft, {what}"),
            compare(f"lora_unet_unfused@{scale:g}", torch_unet, unfused_unet, TOLERANCE,
                    f"LoRA layers (load_attn_procs) vs diffusers + peft, {what}"),
            compare(f"lora_text_encoder@{scale:g}", torch_text, fused_text, TOLERANCE,
                    "LoRA merged vs diffusers + peft, last_hidden_state"),
            compare(f"lora_fused_unfused@{scale:g}", unfused_unet, fused_unet, TOLERANCE,
                    "Paddle UNet, LoRA merged vs LoRA layers"),
        ]
    return checks
