"""python -m export --model LIBRARY --out OUT: static-graph (and ONNX) export of a converted library."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.specs import COMPONENTS
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export", formatter_class=HelpFormatter,
        description="Export the UNet, text encoder and VAE of a library made by `python -m convert` to Paddle static "
                    "programs (OUT/<component>/inference.json + inference.pdiparams) and, with --onnx, ONNX "
                    "(OUT/<component>/model.onnx). Batch, height and width stay dynamic. Every export is checked "
                    "against the dynamic model in Paddle Inference (oneDNN) and onnxruntime before OUT is written.")
    add_version(p)
    p.add_argument("--library", "--model", dest="model", required=True, type=Path,
                   help="a converted ppdiffusers library (python -m convert --out)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the exports into")
    p.add_argument("--components", "--export-components", dest="components", default=",".join(COMPONENTS),
                   help=f"comma-separated subset of {','.join(COMPONENTS)}")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=False,
                   help="also write model.onnx per component (paddle2onnx; weights as external data model.onnx.data "
                        "when over 2 GB) and validate it in onnxruntime")
    p.add_argument("--height", type=int, help="image height in pixels to validate at (a multiple of 8; default 128). "
                   "The export itself works at every size")
    p.add_argument("--width", type=int, help="image width in pixels to validate at (a multiple of 8; default 128)")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated precisions to export and check, of fp32,bf16,int8 (fp32 is always kept as "
                        "the reference). bf16: the static programs in oneDNN bfloat16 (CPUs with "
                        "AVX512-BF16 or AMX). int8: the ONNX UNet quantized by onnxruntime, calibrated on the "
                        "pipeline's own UNet inputs (implies --onnx); kept only where its image PSNR reaches 30 dB")
    p.add_argument("--fidelity-steps", type=int, default=50,
                   help="steps of the interpolation every variant runs to measure its speed and, for bf16/int8, its "
                        "image PSNR and audio spectral convergence against fp32 (50 is riffusion-app's default)")
    p.add_argument("--threads", type=int, help="CPU threads for validation runs (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines, no converter logs")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    from export.exporter import export_library, parse_components

    report = export_library(args.model, args.out, components=parse_components(args.components), onnx=args.onnx,
                            height=args.height, width=args.width, overwrite=args.overwrite, quiet=args.quiet,
                            threads=args.threads, precision=tuple(args.precision.split(",")),
                            fidelity_steps=args.fidelity_steps)
    for name, entry in report["components"].items():
        worst: dict[str, float] = {}
        for check in entry["validation"]:
            worst[check["runtime"]] = max(worst.get(check["runtime"], 0.0), check["max_abs"])
        errors = ", ".join(f"{runtime} {error:.2e}" for runtime, error in worst.items())
        print(f"{name}: max abs error vs the dynamic model {errors} (tolerance {entry['tolerance']:g}, "
              f"{len(report['validation_sizes'])} sizes)")
        for variant, errors in entry.get("precisions", {}).items():
            print(f"{name}[{variant}]: max abs error vs fp32 {errors['max_abs']:.2e}, relative {errors['max_rel']:.2e} "
                  f"(tolerance {errors['tolerance_rel']:g} relative)")
    for variant, entry in report.get("variants", {}).items():
        timing = entry.get("timing", {})
        line = f"{variant}: " + (f"request {timing['estimated_request_s']:.2f} s (estimated)" if timing else "not timed")
        if "psnr_db" in entry:
            line += f", image PSNR {entry['psnr_db']:.1f} dB, audio spectral convergence {entry['spectral_convergence']:.4f}"
        line += "" if entry["shipped"] else f"; not kept: {entry['reason']}"
        print(line)
    print(f"wrote {args.out} ({report['seconds']:.1f} s)")
    return 0
