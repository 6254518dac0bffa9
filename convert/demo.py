"""The built-in demo: build a tiny random-weight riffusion-model-v1 lookalike and make its complete Hub
release from it (library, single file, static and ONNX exports, seed images, card, manifest, all
checked against torch), then verify the release and show what publishing would upload.

python -m convert.demo [--out demo-output]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert import cli
from convert.release import publish, verify
from convert.builtin import build
from riffusion.console import HelpFormatter, add_version, command

REPO_ID = "your-org/riffusion-tiny-paddle"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    torch_dir = args.out / "riffusion-tiny-torch"
    release_dir = args.out / "riffusion-tiny-paddle"
    if not (torch_dir / "model_index.json").is_file():
        build(torch_dir, size="tiny")
    print(f"source (torch, random weights, riffusion-model-v1 layout): {torch_dir}")
    status = cli.main(["--src", str(torch_dir), "--out", str(release_dir), "--overwrite", "--release",
                       "--repo-id", REPO_ID])
    if status == 0:
        status = verify.main([str(release_dir)])
    if status == 0:
        status = publish.main([str(release_dir), "--repo-id", REPO_ID, "--dry-run"])
    if status == 0:
        print(f"release:      {release_dir} (model card: README.md, checksums and parity: manifest.json)")
        print(f"load it with: ppdiffusers.StableDiffusionPipeline.from_pretrained({str(release_dir)!r})")
        print(f"make music:   python -m riffusion text-to-audio 'funky synth solo' funk.wav --checkpoint {release_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
