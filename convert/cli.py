"""python -m convert --src SRC --out DIR: a torch diffusers repo (Hub id or folder) -> ppdiffusers library;
with --release, the complete Hub release folder (library, single file, exports, seed images, card, manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from convert.errors import needs_torch
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--src", required=True, help="Hub repo id (e.g. riffusion/riffusion-model-v1), a local diffusers "
                   "folder, or a single-file LDM checkpoint (.ckpt / .safetensors)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the ppdiffusers library into")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-check", action="store_true", help="skip the torch-vs-Paddle parity run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", help="single-file sources: a diffusers or ppdiffusers folder or Hub id to take configs, "
                   "tokenizer and scheduler from (default: built-in Stable Diffusion v1 configs)")
    p.add_argument("--ema", action="store_true", help="single-file sources: take the EMA UNet weights (model_ema.*). "
                   "Off by default: the plain weights are what diffusers, ppdiffusers and WebUI tools load from it")
    p.add_argument("--revision", help="Hub sources: the branch, tag or commit to convert (default: main)")
    release = p.add_argument_group("release", "--release writes the complete Hub folder (see convert/release/)")
    release.add_argument("--release", action="store_true", help="also write the compiled single file, the static and "
                         "ONNX exports, the seed images, README.md (the model card) and manifest.json into --out")
    release.add_argument("--repo-id", help="the Hub repo the release will be published to (named in the model card)")
    release.add_argument("--components", "--export-components", dest="export_components",
                         help="comma-separated subset of unet,text_encoder,vae_encoder,vae_decoder to export "
                              "(default: all)")
    release.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                         help="also write model.onnx per exported component (--no-onnx: static Paddle programs only)")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    with needs_torch("python -m convert"):
        return _release(args) if args.release else _library(args)


def _library(args) -> int:
    from convert.library import convert_library
    from convert.source import resolve

    check = None
    single_file = Path(args.src).is_file()
    if args.revision and not single_file:
        args.src = str(resolve(args.src, args.revision))
    if single_file and not args.no_check and (args.ema or _paddle_configs(args.config)):
        print("parity: not run (diffusers' single-file reader takes neither --ema nor ppdiffusers configs)")
    elif single_file and not args.no_check:
        from convert.parity import check_single_file_during_conversion

        check = check_single_file_during_conversion(args.src, args.config)
    elif not args.no_check:
        from convert.parity import check_during_conversion

        check = check_during_conversion(args.src, quiet=args.quiet)
    report = convert_library(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, quiet=args.quiet,
                             check=check, config=args.config, ema=args.ema)
    parts = ", ".join(f"{name} {part['mapped']} tensors" for name, part in report["parts"].items())
    print(f"wrote {args.out} ({parts}; {report['seconds']:.1f} s)")
    return 0


def _paddle_configs(config: str | None) -> bool:
    """Whether --config names a converted (ppdiffusers) library rather than torch diffusers configs."""
    from convert.single_file import is_paddle_library

    return config is not None and Path(config).is_dir() and is_paddle_library(Path(config))


def _release(args) -> int:
    from convert.release import build_release
    from export.exporter import parse_components

    manifest = build_release(args.src, args.out, revision=args.revision, repo_id=args.repo_id, dtype=args.dtype,
                             overwrite=args.overwrite, quiet=args.quiet, check=not args.no_check,
                             config=args.config, ema=args.ema, components=parse_components(args.export_components),
                             onnx=args.onnx)
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    library = manifest["parity"]["library"]
    parity = (f"{len(library['checks'])} parity checks passed" if library.get("checks")
              else f"parity vs torch not run ({library['reason']})")
    print(f"wrote release {args.out}: {len(manifest['files'])} files, {total / 1e9:.2f} GB; {parity}; "
          f"check it with: python -m convert.verify {args.out}")
    return 0
