"""The built-in demo: build a tiny random-weight riffusion-model-v1 lookalike, convert it, check parity.

python -m convert.demo [--out demo-output]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert import cli
from convert.builtin import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    torch_dir = args.out / "riffusion-tiny-torch"
    paddle_dir = args.out / "riffusion-tiny-paddle"
    if not (torch_dir / "model_index.json").is_file():
        build(torch_dir, size="tiny")
    print(f"source (torch, random weights, riffusion-model-v1 layout): {torch_dir}")
    status = cli.main(["--src", str(torch_dir), "--out", str(paddle_dir), "--overwrite"])
    if status == 0:
        print(f"ppdiffusers library: {paddle_dir}")
        print(f"conversion report:   {paddle_dir / 'conversion_report.json'}")
        print(f"load it with:        ppdiffusers.StableDiffusionPipeline.from_pretrained({str(paddle_dir)!r})")
    return status


if __name__ == "__main__":
    sys.exit(main())
