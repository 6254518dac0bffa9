"""Numeric parity: the same inputs through the torch original (diffusers, transformers) and the
converted ppdiffusers library, per part and end to end.

python -m convert.parity --src SRC --library DIR [--export EXPORT] [--lora LORA] [--json FILE]   exit 1 when any check fails

With `--exported` (a folder made by `python -m export`), the static (Paddle Inference) and ONNX
programs it holds are compared with the same torch references too: `unet[static]`, `unet[onnx]`, ...,
and, when all of UNet, text encoder and VAE are exported, the end-to-end `pipeline[static]` / `pipeline[onnx]`.
Reduced-precision variants the export holds and this CPU runs (`unet[static-bf16]`, `unet[onnx-int8]`, ...)
are held to their own bar, relative to the largest torch value: export.precision.RELATIVE_TOLERANCE.

With `--lora` (a LoRA file or a folder holding one, torch or Paddle layout), the library with that LoRA applied
is compared with diffusers + peft with the same LoRA at scales 0.5 and 1.0, merged and unmerged, and the LoRA's
Paddle -> torch -> Paddle round trip must be bitwise: convert/lora_parity.py.

Errors are absolute (max |torch - paddle|); the relative figure is max_abs / max |torch|. When the
library was written in float16 the torch reference gets the same float16-rounded weights, so both
sides compute from identical numbers and the fp32 tolerances still apply.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convert.errors import ConversionError, needs_torch
from riffusion.console import HelpFormatter, add_version, command, native_stdout_silenced, quiet_third_party

# Absolute tolerances, float32 compute. optimum's exporter uses text 1e-3, unet 1e-4, vae 3e-4.
TOLERANCES = {
    "text_encoder": 1e-4,
    "unet": 1e-4,
    "vae_encode": 1e-4,
    "vae_decode": 1e-4,
    "image_processor": 1e-5,
    "safety_checker": 1e-4,
    "pipeline": 1e-3,
}

MUSIC_PROMPTS = [
    "",
    "funky synth solo",
    "jazzy rapping from paris",
    "lo-fi beat for the holidays, 90 BPM, vinyl crackle",
    "Church bells on SUNDAY!!!   (reverb)",
    "techno, 128bpm – Berlin basement; acid 303 line",
    "mariachi trumpets ☀️ über café",
    "epic orchestral soundtrack " * 12,  # longer than 77 tokens: truncation
]


@dataclass
class Check:
    name: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool
    detail: str = ""


def compare(name: str, reference, candidate, tolerance: float | None = None, detail: str = "") -> Check:
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    tolerance = TOLERANCES[name] if tolerance is None else tolerance
    if reference.shape != candidate.shape:
        return Check(name, float("inf"), float("inf"), tolerance, False, f"shape {candidate.shape} != {reference.shape}")
    max_abs = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    max_rel = max_abs / scale if scale else max_abs
    passed = bool(np.isfinite(candidate).all()) and max_abs <= tolerance
    return Check(name, max_abs, max_rel, tolerance, passed, detail or f"shape {list(reference.shape)}")


class Sides:
    """Loads each part of both models on demand, one part at a time."""

    def __init__(self, torch_folder: Path, paddle_folder: Path, exported: Path | None = None):
        self.torch_folder = Path(torch_folder)
        self.paddle_folder = Path(paddle_folder)
        self.exported = Path(exported) if exported else None
        self.half_weights = _weights_are_half(self.paddle_folder)
        if self.exported and not self.exported.is_dir():
            raise ConversionError(f"{self.exported}: no such export folder")

    def backends(self, *components: str) -> list[str]:
        """The exported runtimes ("static", "onnx") available for every one of `components`, then the
        reduced-precision variants ("static-bf16", "onnx-int8") the export keeps and this CPU runs."""
        if self.exported is None:
            return []
        from export import precision as precisions
        from export.runtime import ONNX_MODEL, STATIC_PROGRAM, read_report

        files = {"static": STATIC_PROGRAM, "onnx": ONNX_MODEL}
        found = [backend for backend, name in files.items()
                 if all((self.exported / component / name).is_file() for component in components)]
        variants = read_report(self.exported).get("variants", {})
        for name, entry in variants.items():
            if (entry["precision"] != "fp32" and entry.get("shipped") and entry["runtime"] in found
                    and precisions.supported(entry["precision"])
                    and (entry["precision"] != "int8" or any(part in precisions.INT8_COMPONENTS for part in components))):
                found.append(name)
        return found

    def runtime(self, component: str, backend: str):
        from export.runtime import load_component

        runtime, _, precision = backend.partition("-")
        return load_component(self.exported, component, runtime, precision=precision or "fp32")

    def torch_model(self, cls, name: str):
        import torch

        model = cls.from_pretrained(self.torch_folder / name).eval()
        if self.half_weights:
            model.to(torch.float16).to(torch.float32)
        return model

    def paddle_model(self, cls, name: str, **kwargs):
        import paddle

        model = cls.from_pretrained(str(self.paddle_folder / name), **kwargs)
        model.to(dtype=paddle.float32)
        model.eval()
        return model


def variant_tolerance(name: str, backend: str, reference) -> tuple[float, str]:
    """(absolute tolerance, how it was set) for `name` run on `backend`: the fp32 one, or a reduced
    precision's relative bar times the largest reference value."""
    from export.precision import RELATIVE_TOLERANCE

    _, _, precision = backend.partition("-")
    if not precision:
        return TOLERANCES[name], ""
    relative = RELATIVE_TOLERANCE[precision]
    return relative * float(np.max(np.abs(reference))), f", {precision} bar {relative:g} relative"


def quiet_libraries() -> None:
    """The libraries log every load at INFO/WARNING; the parity table is what matters here."""
    import logging
    import warnings

    import diffusers
    import ppdiffusers
    import transformers
    from paddlenlp.utils.log import logger as paddlenlp_logger

    warnings.filterwarnings("ignore")
    for library in (diffusers, ppdiffusers, transformers):
        library.utils.logging.set_verbosity(logging.CRITICAL)  # diffusers logs its .bin fallback as an error
        library.utils.logging.disable_progress_bar()
    paddlenlp_logger.set_level("ERROR")
    logging.getLogger("paddle").setLevel(logging.ERROR)


def run_parity(torch_src: str, paddle_dir: Path, steps: int = 3, latent_size: int | None = None,
               exported: Path | None = None, progress: bool = False, lora=None) -> tuple[list[Check], dict]:
    """`progress`: name each part on stderr as it starts (a real model takes minutes). `lora`: a
    convert.lora_parity.LoRA (read_lora) to check on the library too."""
    import paddle
    import torch

    from convert.source import resolve

    quiet_libraries()
    torch.manual_seed(0)
    paddle.seed(0)
    sides = Sides(resolve(torch_src), Path(paddle_dir), exported)
    unet_config = json.loads((sides.paddle_folder / "unet" / "config.json").read_text())
    latent = latent_size or min(int(unet_config.get("sample_size", 64)), 32)
    settings = {"latent_size": latent, "image_size": latent * 8, "steps": steps, "half_weights": sides.half_weights}
    checks: list[Check] = []
    parts = [("tokenizer", _tokenizer_checks), ("text encoder", _text_encoder_checks),
             ("unet", lambda sides: _unet_checks(sides, latent, unet_config)), ("vae", lambda sides: _vae_checks(sides, latent))]
    if (sides.paddle_folder / "safety_checker").is_dir():
        parts.append(("safety checker", _safety_checker_checks))
    parts.append((f"pipeline, {steps} steps", lambda sides: _pipeline_checks(sides, latent, steps)))
    if lora is not None:
        from convert.lora_parity import lora_checks

        settings["lora"] = str(lora.path)
        parts.append((f"lora {lora.path.name}", lambda sides: lora_checks(lora, sides.torch_folder, sides.paddle_folder,
                                                                          latent, sides.half_weights)))
    try:
        with torch.no_grad(), paddle.no_grad():
            for number, (what, run) in enumerate(parts, 1):
                if progress:
                    print(f"parity [{number}/{len(parts)}]: {what}", file=sys.stderr, flush=True)
                checks += run(sides)
    except OSError as error:  # what diffusers, transformers and ppdiffusers raise for a model they cannot load
        reason = " ".join(str(error).split())[:300]
        raise ConversionError(f"parity: a model could not be loaded: {reason}") from None
    return checks, settings


def _tokenizer_checks(sides: Sides) -> list[Check]:
    from ppdiffusers.transformers import CLIPTokenizer as PaddleTokenizer
    from transformers import CLIPTokenizer as TorchTokenizer

    kwargs = dict(padding="max_length", max_length=77, truncation=True)
    with native_stdout_silenced():
        torch_tokenizer = TorchTokenizer.from_pretrained(sides.torch_folder / "tokenizer")
    torch_ids = np.array(torch_tokenizer(MUSIC_PROMPTS, **kwargs).input_ids)
    paddle_ids = np.array(PaddleTokenizer.from_pretrained(str(sides.paddle_folder / "tokenizer"))(MUSIC_PROMPTS, **kwargs)["input_ids"])
    mismatched = int((torch_ids != paddle_ids).sum()) if torch_ids.shape == paddle_ids.shape else torch_ids.size
    passed = mismatched == 0
    return [Check("tokenizer", float(mismatched), 0.0, 0.0, passed, f"{len(MUSIC_PROMPTS)} prompts, {mismatched} ids differ")]


def _text_encoder_checks(sides: Sides) -> list[Check]:
    import paddle
    import torch
    from ppdiffusers.transformers import CLIPTextModel as PaddleCLIP
    from transformers import CLIPTextModel as TorchCLIP
    from transformers import CLIPTokenizer

    with native_stdout_silenced():
        tokenizer = CLIPTokenizer.from_pretrained(sides.torch_folder / "tokenizer")
    ids = np.array(tokenizer(MUSIC_PROMPTS[:4], padding="max_length", max_length=77, truncation=True).input_ids)
    reference = sides.torch_model(TorchCLIP, "text_encoder")(torch.from_numpy(ids))
    hidden, pooled = reference.last_hidden_state.numpy(), reference.pooler_output.numpy()
    _release()
    model = sides.paddle_model(PaddleCLIP, "text_encoder", dtype="float32")
    output = model(paddle.to_tensor(ids), return_dict=True)
    checks = [
        compare("text_encoder", hidden, output.last_hidden_state.numpy(), detail=f"last_hidden_state {list(hidden.shape)}"),
        compare("text_encoder", pooled, output.pooler_output.numpy(), detail=f"pooler_output {list(pooled.shape)}"),
    ]
    del model
    _release()
    for backend in sides.backends("text_encoder"):
        output = sides.runtime("text_encoder", backend)(ids)
        name = f"text_encoder[{backend}]"
        for label, expected, got in (("last_hidden_state", hidden, output.last_hidden_state.numpy()),
                                     ("pooler_output", pooled, output.pooler_output.numpy())):
            tolerance, bar = variant_tolerance("text_encoder", backend, expected)
            checks.append(compare(name, expected, got, tolerance, f"{label} {list(expected.shape)}{bar}"))
    return checks


def _unet_checks(sides: Sides, latent: int, config: dict) -> list[Check]:
    import paddle
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from ppdiffusers import UNet2DConditionModel as PaddleUNet

    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, config.get("in_channels", 4), latent, latent), dtype=np.float32)
    timesteps = np.array([981, 21], dtype=np.int64)
    context = rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32)
    model = sides.torch_model(TorchUNet, "unet")
    reference = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample.numpy()
    del model
    _release()
    model = sides.paddle_model(PaddleUNet, "unet")
    output = model(paddle.to_tensor(sample), paddle.to_tensor(timesteps), paddle.to_tensor(context)).sample.numpy()
    del model
    _release()
    detail = f"noise prediction, batch 2, {latent}x{latent} latents"
    checks = [compare("unet", reference, output, detail=detail)]
    for backend in sides.backends("unet"):
        output = sides.runtime("unet", backend)(sample, timesteps, context).sample.numpy()
        tolerance, bar = variant_tolerance("unet", backend, reference)
        checks.append(compare(f"unet[{backend}]", reference, output, tolerance, detail + bar))
        _release()
    return checks


def _vae_checks(sides: Sides, latent: int) -> list[Check]:
    import paddle
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from ppdiffusers import AutoencoderKL as PaddleVAE

    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (1, 3, latent * 8, latent * 8)).astype(np.float32)
    latents = rng.standard_normal((1, 4, latent, latent), dtype=np.float32)
    model = sides.torch_model(TorchVAE, "vae")
    mean = model.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
    decoded = model.decode(torch.from_numpy(latents)).sample.numpy()
    del model
    _release()
    model = sides.paddle_model(PaddleVAE, "vae")
    checks = [
        compare("vae_encode", mean, model.encode(paddle.to_tensor(image)).latent_dist.mean.numpy(), detail="latent_dist.mean"),
        compare("vae_decode", decoded, model.decode(paddle.to_tensor(latents)).sample.numpy(), detail=f"{latent * 8}x{latent * 8} image"),
    ]
    del model
    _release()
    for backend in sides.backends("vae_encoder"):
        output = sides.runtime("vae_encoder", backend).run(sample=image)[0]
        mean_out = np.split(output, 2, axis=1)[0]  # the encoder's moments: mean, then log-variance
        tolerance, bar = variant_tolerance("vae_encode", backend, mean)
        checks.append(compare(f"vae_encode[{backend}]", mean, mean_out, tolerance, "latent_dist.mean" + bar))
    for backend in sides.backends("vae_decoder"):
        output = sides.runtime("vae_decoder", backend).run(latent_sample=latents)[0]
        tolerance, bar = variant_tolerance("vae_decode", backend, decoded)
        checks.append(compare(f"vae_decode[{backend}]", decoded, output, tolerance, f"{latent * 8}x{latent * 8} image" + bar))
    return checks


def _safety_checker_checks(sides: Sides) -> list[Check]:
    import paddle
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as TorchChecker
    from ppdiffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as PaddleChecker
    from ppdiffusers.transformers import CLIPImageProcessor as PaddleProcessor
    from transformers import CLIPImageProcessor as TorchProcessor

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    torch_pixels = TorchProcessor.from_pretrained(sides.torch_folder / "feature_extractor")(images, return_tensors="np").pixel_values
    paddle_pixels = PaddleProcessor.from_pretrained(str(sides.paddle_folder / "feature_extractor"))(images, return_tensors="np").pixel_values
    checks = [compare("image_processor", torch_pixels, paddle_pixels, detail="CLIP preprocessing of 2 images")]
    pixels = torch_pixels.astype(np.float32)

    model = sides.torch_model(TorchChecker, "safety_checker")
    reference = model.visual_projection(model.vision_model(torch.from_numpy(pixels))[1]).numpy()
    del model
    _release()
    model = sides.paddle_model(PaddleChecker, "safety_checker", dtype="float32")
    output = model.visual_projection(model.vision_model(paddle.to_tensor(pixels))[1]).numpy()
    del model
    _release()
    checks.append(compare("safety_checker", reference, output, detail="image embeddings"))
    return checks


def _pipeline_checks(sides: Sides, latent: int, steps: int) -> list[Check]:
    import paddle
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from ppdiffusers import StableDiffusionPipeline as PaddlePipeline

    latents = np.random.default_rng(4).standard_normal((1, 4, latent, latent), dtype=np.float32)
    call = dict(prompt="lo-fi hip hop beat, mellow piano", num_inference_steps=steps, guidance_scale=7.0,
                height=latent * 8, width=latent * 8, output_type="np")
    with native_stdout_silenced():
        pipe = TorchPipeline.from_pretrained(sides.torch_folder, safety_checker=None, requires_safety_checker=False)
    if sides.half_weights:
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.to(torch.float16).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(latents=torch.from_numpy(latents), **call).images
    del pipe
    _release()
    pipe = PaddlePipeline.from_pretrained(str(sides.paddle_folder), paddle_dtype=paddle.float32)
    pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    output = pipe(latents=paddle.to_tensor(latents), **call).images
    del pipe
    _release()
    detail = f"{steps} PNDM steps, guidance 7, {latent * 8}px image in [0,1]"
    checks = [compare("pipeline", reference, output, detail=detail)]
    for backend in sides.backends("unet", "text_encoder", "vae_encoder", "vae_decoder"):
        from export.runtime import load_pipeline

        runtime, _, precision = backend.partition("-")
        pipe = load_pipeline(sides.paddle_folder, sides.exported, unet=runtime, text_encoder=runtime, vae=runtime,
                             precision=precision or "fp32")
        output = pipe(latents=paddle.to_tensor(latents), **call).images
        tolerance, bar = variant_tolerance("pipeline", backend, reference)
        checks.append(compare(f"pipeline[{backend}]", reference, output, tolerance, detail + bar))
        del pipe
        _release()
    return checks


def _weights_are_half(folder: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(folder / "unet" / "diffusion_paddle_model.safetensors"), framework="np") as handle:
        first = next(iter(handle.keys()))
        return handle.get_slice(first).get_dtype() == "F16"


def _release() -> None:
    gc.collect()


def format_table(checks: list[Check]) -> str:
    width = max([20] + [len(check.name) for check in checks])
    rows = [f"{'check':<{width}} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  result  what"]
    for check in checks:
        tolerance = "exact" if check.tolerance == 0 else f"{check.tolerance:.0e}"
        rows.append(
            f"{check.name:<{width}} {check.max_abs:>10.2e} {check.max_rel:>10.2e} {tolerance:>10}  "
            f"{'ok' if check.passed else 'FAIL':<6}  {check.detail}"
        )
    return "\n".join(rows)


def to_json(checks: list[Check], settings: dict) -> dict:
    return {"passed": all(check.passed for check in checks), "settings": settings, "checks": [asdict(c) for c in checks]}


def check_during_conversion(torch_src: str, quiet: bool = False):
    """The hook `convert` runs on its staging folder before moving it into place."""

    def check(staging: Path, report: dict) -> None:
        report["parity"] = required_parity(torch_src, staging)

    return check


def check_single_file_during_conversion(single: str, config: str | None):
    """The parity hook for a single-file source: the torch side is what diffusers' own reader
    (from_single_file, code independent of ours) makes of the same file with the same configs. Where
    diffusers cannot read the file (layouts only this converter reads), parity is reported as not run."""

    def check(staging: Path, report: dict) -> None:
        with tempfile.TemporaryDirectory(prefix=".single-file-reference-", dir=staging.parent) as work:
            reference, reason = single_file_reference(Path(single), config, Path(work))
            if reference is None:
                print(f"parity: not run, diffusers cannot read {single} ({reason})")
                report["parity"] = {"ran": False, "reason": f"diffusers cannot read the file: {reason}"}
                return
            report["parity"] = required_parity(str(reference), staging)
            report["parity"]["torch_reference"] = "diffusers StableDiffusionPipeline.from_single_file"

    return check


def single_file_reference(single: Path, config: str | None, work: Path) -> tuple[Path | None, str]:
    """A torch diffusers folder in `work` read from the single file by diffusers, with the configs the
    converter used: `config` (a diffusers folder or Hub id), else FILE.yaml beside it, else the built-in SD
    v1 ones; (None, why) if diffusers cannot."""
    from diffusers import StableDiffusionPipeline

    from convert.source import resolve

    original = single.with_suffix(".yaml")
    if config is not None:
        configs = {"config": str(resolve(config))}
    elif original.is_file():  # the converter read its configs from FILE.yaml: so does diffusers
        configs = {"original_config": str(original)}
    else:
        from convert.builtin import write_configs

        write_configs(work / "configs", "full", safety_checker=False)
        configs = {"config": str(work / "configs")}
    quiet_libraries()
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(single), local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False, **configs)
    except Exception as error:  # diffusers' reader raises its own kinds (SingleFileComponentError...) as well
        return None, " ".join(str(error).split())[:200]
    pipe.save_pretrained(work / "reference")
    return work / "reference", ""


def required_parity(torch_src: str, paddle_dir: Path, exported: Path | None = None, show: bool = True) -> dict:
    """Run parity (printing the table when `show`) and return its JSON; ConversionError when any check fails."""
    checks, settings = run_parity(torch_src, paddle_dir, exported=exported, progress=show)
    result = to_json(checks, settings)
    if show:
        print(format_table(checks))
    if not result["passed"]:
        failed = ", ".join(sorted({c.name for c in checks if not c.passed}))
        raise ConversionError(f"parity failed ({failed}): nothing written")
    return result


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.parity", description="torch vs Paddle parity of a converted "
                                     "library: exit status 1 when any check fails",
                                     formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("--src", "--torch", dest="torch", required=True,
                        help="the torch source: Hub id or diffusers folder")
    parser.add_argument("--library", "--paddle", dest="paddle", required=True, type=Path,
                        help="the converted ppdiffusers library")
    parser.add_argument("--export", "--exported", dest="exported", type=Path, help="an export of the library (python -m export): also compare its "
                        "static and ONNX programs with torch")
    parser.add_argument("--lora", type=Path, metavar="FILE_OR_DIR", help="a LoRA for the library (torch: diffusers, "
                        "peft, kohya; or Paddle): also compare it applied in Paddle with diffusers + peft at scales 0.5 "
                        "and 1.0 and check its Paddle -> torch -> Paddle round trip is bitwise")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of the end-to-end run")
    parser.add_argument("--latent-size", type=int, help="latent height/width (default: the UNet's sample_size, at most 32)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    args = parser.parse_args(argv)
    quiet_third_party()
    if not (args.paddle / "model_index.json").is_file():
        raise ConversionError(f"{args.paddle}: not a converted library (no model_index.json)")
    with needs_torch("python -m convert.parity"):
        lora = None
        if args.lora is not None:  # read first: bad input is refused before minutes of checks
            from convert.lora_parity import read_lora

            lora = read_lora(args.lora, args.paddle)
        checks, settings = run_parity(args.torch, args.paddle, steps=args.steps, latent_size=args.latent_size,
                                      exported=args.exported, progress=not args.quiet, lora=lora)
    print(format_table(checks))
    result = to_json(checks, settings)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("parity: all checks passed" if result["passed"] else "parity: FAILED")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
