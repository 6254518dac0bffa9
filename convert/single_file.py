"""python -m convert.single_file --src SRC --out FILE: the compiled single-file checkpoint.

SRC is a torch diffusers repo (Hub id or folder) or a Paddle library made by `convert`; both give the
same file. FILE is `.safetensors` (flat, streamed one tensor at a time) or `.ckpt`
(`{"state_dict": ..., "global_step": ...}`; torch.save needs every tensor in memory at once).
UNet, VAE and CLIP text encoder are written with the original LDM names, sorted by name, and the
original model config beside it as FILE's stem + `.yaml` (what from_single_file and WebUI tools read).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from convert.components import CLIP_TEXT, UNET, VAE, Part
from convert.errors import ConversionError
from convert.ldm import TEXT_PREFIX, NameMap, is_vae_attention_weight, original_config, unet_blocks, vae_blocks
from convert.library import DTYPES, Move, folder_tensors, plan_part
from convert.source import part_folder, resolve
from riffusion.files import (check_apart, interrupted_by_sigterm, model_root, os_errors_as_input_errors, plain_file,
                             read_json, staging_path)
from convert.tensorfile import SourceTensor, TensorFile
from convert.writer import StreamingSafetensorsWriter
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party

PARTS: dict[str, Part] = {"unet": UNET, "vae": VAE, "text_encoder": CLIP_TEXT}


def is_paddle_library(folder: Path) -> bool:
    return (folder / "unet" / UNET.paddle_weights).is_file()


def plan(folder: Path) -> tuple[list[tuple[str, Move]], list[TensorFile], dict]:
    """(LDM name, move) for every tensor of the three parts, sorted by LDM name; fails naming any
    tensor that is unknown, misshapen or missing."""
    paddle = is_paddle_library(folder)
    root = model_root(folder)
    entries, files, dropped = [], [], {}
    for name, part in PARTS.items():
        config_path = part_folder(folder / name, root) / part.config_file
        if paddle:
            part_files = [TensorFile(plain_file(folder / name / part.paddle_weights, root))]
            tensors = [SourceTensor(f, key, key, paddle_layout=True) for f in part_files for key in f.shapes]
        else:
            part_files, tensors = folder_tensors(folder / name, part)
        part_plan = plan_part(name, part, config_path, part_files, tensors)
        names = None if name == "text_encoder" else NameMap((unet_blocks if name == "unet" else vae_blocks)(part_plan.config))
        for move in part_plan.moves:
            ldm_name = TEXT_PREFIX + move.target_name if names is None else names.to_ldm(move.target_name)
            if ldm_name is None:
                raise ConversionError(f"{move.source.where}: no LDM name for {move.target_name!r}")
            entries.append((ldm_name, move))
        files += part_files
        dropped[name] = part_plan.dropped
    entries.sort(key=lambda entry: entry[0])
    return entries, files, dropped


def torch_layout(move: Move, ldm_name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = move.source.file.read(move.source.file_name)
    if move.linear and move.source.paddle_layout:
        tensor = tensor.t()
    if is_vae_attention_weight(ldm_name):
        tensor = tensor[:, :, None, None]
    return tensor.to(dtype).contiguous()


def out_shape(move: Move, ldm_name: str) -> tuple[int, ...]:
    shape = move.source.shape
    if move.linear and move.source.paddle_layout:
        shape = tuple(reversed(shape))
    return shape + (1, 1) if is_vae_attention_weight(ldm_name) else shape


def write_single_file(src: str, out: Path, dtype: str = "float32", overwrite: bool = False, quiet: bool = False,
                      global_step: int = 0) -> dict:
    started = time.perf_counter()
    out = Path(out)
    yaml_path = out.with_suffix(".yaml")
    if out.suffix not in (".safetensors", ".ckpt"):
        raise ConversionError(f"{out}: the output must end in .safetensors or .ckpt")
    for path in (out, yaml_path):  # the config beside the file is an output too
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ConversionError(f"{path}: exists (pass --overwrite to replace it)")
        if path.is_dir():
            raise ConversionError(f"{path}: a folder, not a file")
    folder = resolve(src)
    check_apart(out, folder)
    entries, files, dropped = plan(folder)
    target = DTYPES[dtype]
    root = model_root(folder)
    configs = {name: read_json(folder / name / "config.json", root) for name in ("unet", "vae")}
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json", root)
    with interrupted_by_sigterm(), os_errors_as_input_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(out)
        yaml_staging = staging_path(yaml_path)
        yaml_written = False
        try:
            with tqdm(total=len(entries), unit="tensor", desc="single file", disable=quiet) as progress:
                if out.suffix == ".safetensors":
                    layout = [(name, torch.empty((), dtype=target).numpy().dtype, out_shape(move, name)) for name, move in entries]
                    writer = StreamingSafetensorsWriter(staging, layout, {"format": "pt"})
                    try:
                        for name, move in entries:
                            writer.write(name, torch_layout(move, name, target).numpy())
                            progress.update()
                    except BaseException:
                        writer.abort()
                        raise
                    writer.close()
                else:
                    state = {}
                    for name, move in entries:
                        state[name] = torch_layout(move, name, target).clone()
                        progress.update()
                    torch.save({"state_dict": state, "global_step": global_step}, staging)
            yaml_staging.write_text(yaml.safe_dump(original_config(configs["unet"], configs["vae"], scheduler), sort_keys=False))
            for path in (out, yaml_path):  # written meanwhile by another process: not replaced
                if (path.exists() or path.is_symlink()) and not overwrite:
                    raise ConversionError(f"{path}: appeared while writing (pass --overwrite to replace it)")
            yaml_staging.replace(yaml_path)
            yaml_written = True
            staging.replace(out)
        except BaseException:
            staging.unlink(missing_ok=True)
            yaml_staging.unlink(missing_ok=True)
            if yaml_written:  # only ever a yaml this run wrote
                yaml_path.unlink(missing_ok=True)
            raise
        finally:
            for file in files:
                file.close()
    return {"source": str(src), "kind": "paddle library" if is_paddle_library(folder) else "torch repo",
            "tensors": len(entries), "dropped": dropped, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3)}


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.single_file", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("--src", required=True, help="torch diffusers repo (Hub id or folder) or a library made by convert")
    parser.add_argument("--out", required=True, type=Path, help="FILE.safetensors or FILE.ckpt")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--global-step", type=int, default=0, help=".ckpt only: the global_step entry")
    args = parser.parse_args(argv)
    quiet_third_party()
    report = write_single_file(args.src, args.out, args.dtype, args.overwrite, args.quiet, args.global_step)
    print(f"wrote {args.out} ({report['tensors']} tensors from a {report['kind']}, {report['bytes'] / 1e9:.2f} GB, "
          f"{report['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
