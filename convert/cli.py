"""python -m convert --src SRC --out DIR: a torch diffusers repo (Hub id or folder) -> ppdiffusers library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.errors import ConversionError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split(": ", 1)[1])
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from convert.library import convert_library

        check = None
        single_file = Path(args.src).is_file()
        if single_file and not args.no_check:
            print("parity: not run for a single-file source; compare against its diffusers repo with convert.parity")
        if not args.no_check and not single_file:
            from convert.parity import check_during_conversion

            check = check_during_conversion(args.src, quiet=args.quiet)
        report = convert_library(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, quiet=args.quiet,
                                 check=check, config=args.config, ema=args.ema)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    parts = ", ".join(f"{name} {part['mapped']} tensors" for name, part in report["parts"].items())
    print(f"wrote {args.out} ({parts}; {report['seconds']:.1f} s)")
    return 0
