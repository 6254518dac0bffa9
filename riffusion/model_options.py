"""How a converted library runs, chosen the same way everywhere: the options (--library, --export, --runtime,
--precision, --scheduler, --lora, --lora-scale) are defined once here for the riffusion CLI, the stdlib
server (riffusion.server) and the Ray Serve app (riffusion.serve, its command line and serve_config.yaml),
and `ModelOptions.load` is the one way they load the model: a release's own export/, else the library's
UNet exported once into the user cache (export/cache.py) and run in Paddle Inference, unless
--runtime dynamic (or a LoRA) asks for Paddle's eager mode. Imports neither Paddle nor ppdiffusers."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from export.precision import PRECISIONS, RUNTIME_PRECISIONS
from riffusion.errors import InputError

RUNTIMES = ("dynamic", *RUNTIME_PRECISIONS)
# name -> (ppdiffusers class, config overrides); "library": the scheduler the model ships with (PNDM for
# riffusion-model-v1). DPM-Solver++ (2nd-order multistep) reaches a comparable image in fewer steps.
SCHEDULERS = {
    "library": None,
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def finite(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--library", "--checkpoint", dest="checkpoint", type=Path, required=True,
                        help="a library made by python -m convert, or a release folder (convert --release), which "
                             "brings its own export/ and seed_images/")
    parser.add_argument("--export", "--exported", dest="export", type=Path,
                        help="a folder made by python -m export (default: a release's own export/; for a plain "
                             "library its UNet's static program, exported once on first use into the user cache, "
                             "~/.cache/riffusion-paddle or $RIFFUSION_PADDLE_CACHE)")
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="static: Paddle Inference; onnx: onnxruntime (needs an export made with --onnx); "
                             "dynamic: Paddle's eager mode, about 20x slower on CPU. Default: the fastest the "
                             "export timed when it was made (dynamic with --lora). What runs each part is printed")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="default: that of the fastest variant the export holds that this CPU runs")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="library",
                        help="the library's own scheduler (PNDM for riffusion) or DPM-Solver++, which needs fewer steps")
    parser.add_argument("--lora", type=Path, help="a LoRA run folder (python -m riffusion.train) or converted LoRA, "
                                                  "merged into the dynamic models")
    parser.add_argument("--lora-scale", type=finite, default=1.0, help="LoRA strength; 0 is the base model")


@dataclass(frozen=True)
class ModelOptions:
    """The values of add_model_options' flags (picklable: Ray sends them to every model replica)."""

    checkpoint: Path
    export: Path | None = None
    runtime: str | None = None
    precision: str | None = None
    scheduler: str = "library"
    lora: Path | None = None
    lora_scale: float = 1.0

    def __post_init__(self):
        for name in ("checkpoint", "export", "lora"):  # strings from Python callers and config files too
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelOptions":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def check(self) -> None:
        """What can be checked before any export or model load (the LoRA file is read): InputError naming the
        problem."""
        if not (self.checkpoint / "model_index.json").is_file():
            raise InputError(f"{self.checkpoint}: not a converted library (no model_index.json); make one with "
                             "python -m convert")
        if self.export is not None and not self.export.is_dir():
            raise InputError(f"{self.export}: no such export folder; make one with python -m export")
        if self.lora is not None:
            from riffusion.lora import read

            read(self.lora)

    def prepare(self, quiet: bool = False) -> tuple[Path | None, str, str]:
        """check(), then what load() will run, (export folder, runtime, precision), without loading the model;
        a plain library's UNet is exported into the cache here when it is not there yet."""
        from export.cache import export_for
        from riffusion.pipeline import RiffusionPipeline

        self.check()
        runtime = self.runtime or ("dynamic" if self.lora else None)  # a LoRA is fused into the dynamic models only
        exported = export_for(self.checkpoint, self.export, runtime, quiet)
        return RiffusionPipeline.plan(self.checkpoint, exported, runtime, self.precision, self.lora)

    def load(self, progress: bool = False, quiet: bool = False):
        """The RiffusionPipeline these options ask for; unless `quiet`, says on stderr what runs each part."""
        from riffusion.pipeline import RiffusionPipeline

        exported, runtime, precision = self.prepare(quiet)
        pipeline = RiffusionPipeline.from_pretrained(self.checkpoint, progress=progress, exported=exported,
                                                     runtime=runtime, precision=precision, scheduler=self.scheduler,
                                                     lora=self.lora, lora_scale=self.lora_scale)
        if not quiet:
            print(f"running: {engines(pipeline.pipe)}", file=sys.stderr, flush=True)
        return pipeline


def engines(pipe) -> str:
    """Which engine runs each part of a loaded ppdiffusers pipeline, as the user should know it."""
    def engine(model) -> str:
        session = getattr(model, "session", None) or getattr(getattr(model, "decoder", None), "session", None)
        if session is None:
            return "Paddle dynamic"
        return "onnxruntime" if type(session).__name__ == "OnnxSession" else "Paddle Inference"

    return ", ".join(f"{name} {engine(getattr(pipe, name))}" for name in ("unet", "text_encoder", "vae"))
