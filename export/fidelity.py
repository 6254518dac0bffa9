"""What a precision costs, end to end, and how fast each exported variant runs a request.

One riffusion-app request (an interpolation between two prompts from the og_beat seed image, the
library's own scheduler) runs on each variant of an export (static fp32, static bf16, onnx fp32,
onnx int8) from the same seeds. Against the static fp32 run: the PSNR of the final image and the
spectral convergence ||S - S'|| / ||S|| of its audio's STFT magnitude. Every run is timed by stage
(each component's session calls), which gives the variant's estimated request time the runtime
choice ranks by. The fp32 run also records the UNet's inputs: every other one is the int8 calibration set, the rest the
inputs its error is measured on.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

START = dict(prompt="church bells on sunday", seed=42, denoising=0.75, guidance=7.0)
END = dict(prompt="jazz with piano", seed=123, denoising=0.75, guidance=7.0)
ALPHA = 0.5
SEED_IMAGE = "og_beat"
RECORDED_SAMPLES = 16  # UNet inputs the fp32 run keeps: half calibrate int8, half measure it
APP_STEPS = 50  # riffusion-app's default


class TimedSession:
    """Wraps a runtime session: times each run, and keeps some of its inputs when `record` is a list."""

    def __init__(self, session, seconds: list, record: list | None = None, every: int = 1):
        self.session, self.seconds, self.record, self.every = session, seconds, record, every
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, inputs):
        if self.record is not None and self.calls % self.every == 0 and len(self.record) < RECORDED_SAMPLES:
            self.record.append({name: np.array(value) for name, value in inputs.items()})
        self.calls += 1
        started = time.perf_counter()
        out = self.session.run(inputs)
        self.seconds.append(time.perf_counter() - started)
        return out


def run_request(library: Path, exported: Path, runtime: str, precision: str, components: tuple[str, ...],
                steps: int, threads: int | None = None, record: list | None = None) -> dict:
    """Run the request on one variant; components not in `components` run in Paddle dynamic mode.
    Returns the image (uint8 array), the audio and the seconds per stage."""
    from riffusion import seed_images
    from riffusion.audio import image_to_audio
    from riffusion.pipeline import PromptInput, RiffusionPipeline

    from export.runtime import load_pipeline

    def backend(*names):
        return runtime if all(name in components for name in names) else "dynamic"

    pipe = load_pipeline(library, exported, unet=backend("unet"), text_encoder=backend("text_encoder"),
                         vae=backend("vae_encoder", "vae_decoder"), threads=threads, precision=precision)
    stages: dict[str, list] = {name: [] for name in ("text_encoder", "vae_encoder", "unet", "vae_decoder")}
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
             "vae_encoder": getattr(pipe.vae, "encoder", None), "vae_decoder": getattr(pipe.vae, "decoder", None)}
    for name, part in parts.items():
        if hasattr(part, "session"):
            every = max(1, steps // RECORDED_SAMPLES) if name == "unet" else 1
            part.session = TimedSession(part.session, stages[name], record if name == "unet" else None, every)

    riffusion = RiffusionPipeline(pipe)
    side = pipe.unet.config.get("sample_size", 64) * riffusion.vae_scale
    seed = seed_images.load(SEED_IMAGE).convert("RGB").resize((side, side))
    started = time.perf_counter()
    image = riffusion.interpolate(PromptInput(**START), PromptInput(**END), ALPHA, seed, num_inference_steps=steps)
    pipeline_s = time.perf_counter() - started
    started = time.perf_counter()
    audio, _ = image_to_audio(image, spectrogram_params(image.height))
    audio_s = time.perf_counter() - started
    return {"image": np.asarray(image), "audio": audio, "stages": stages, "pipeline_s": pipeline_s, "audio_s": audio_s}


def run_in_child(library: Path, exported: Path, runtime: str, precision: str, components: tuple[str, ...],
                 steps: int, threads: int | None, record: bool) -> dict:
    """run_request in a process of its own (the exporter's child): the run, with the UNet inputs it
    recorded under "calibration" (empty unless `record`)."""
    from export.runtime import use_all_cores

    use_all_cores(threads)
    calibration: list = []
    run = run_request(library, exported, runtime, precision, components, steps, threads,
                      record=calibration if record else None)
    run["calibration"] = calibration
    return run


def timing(run: dict) -> dict:
    """Seconds per call of each stage, and the request they add up to at riffusion-app's 50 steps."""
    stages = run["stages"]
    per_call = {name: round(statistics.median(times[1:] if len(times) > 2 else times), 4)
                for name, times in stages.items() if times}
    unet_calls = int(APP_STEPS * START["denoising"]) + 1
    estimate = (per_call.get("text_encoder", 0) * 4 + per_call.get("vae_encoder", 0)
                + per_call.get("unet", 0) * unet_calls + per_call.get("vae_decoder", 0) + run["audio_s"])
    return {"per_call_s": per_call, "pipeline_s": round(run["pipeline_s"], 3), "audio_s": round(run["audio_s"], 3),
            "estimated_request_s": round(estimate, 3), "estimate": f"4 text encodings, 1 VAE encode, {unet_calls} "
            f"UNet calls (50 steps at denoising {START['denoising']}), 1 VAE decode, spectrogram to audio"}


def compare(reference: dict, run: dict) -> dict:
    """PSNR of the image and spectral convergence of the audio against the reference run."""
    from riffusion.spectrogram import spectral_convergence, stft_magnitude

    from export.precision import psnr

    params = spectrogram_params(reference["image"].shape[0])
    return {"psnr_db": round(psnr(reference["image"], run["image"]), 2),
            "spectral_convergence": round(spectral_convergence(stft_magnitude(reference["audio"], params),
                                                               stft_magnitude(run["audio"], params)), 5)}


def spectrogram_params(height: int):
    """Riffusion's spectrogram settings with one mel bin per image row (512 for the real model; fewer
    for the tiny test models' small images)."""
    from riffusion.params import SpectrogramParams

    return dataclasses.replace(SpectrogramParams(), num_frequencies=height)
