"""One riffusion-app request, end to end and by stage, in every runtime and precision, against torch in
the same run.

    python scripts/bench_app.py --model LIBRARY --torch TORCH_REPO --export EXPORT [--steps 50]
        [--scheduler library|dpmsolver++] [--backends torch,dynamic,static-fp32,...] [--json FILE]

The request is what riffusion-app sends by default: an interpolation (alpha 0.5) between two prompts
from the og_beat seed image at the model's size (512x512 for the real one), denoising 0.75, guidance 7,
`--steps` steps, then the VAE decode, spectrogram image to audio (riffusion.audio) and MP3 encoding.
Stages: text encoding (one call of the 4 prompts: both prompts and both negative prompts), VAE encode of
the seed image, the UNet steps (batch 2: classifier-free guidance), VAE decode, spectrogram to audio, MP3.
The Paddle pipeline keeps the encodings of prompts it has seen (the app repeats its prompts request after
request); every timed request here starts without them, so text encoding is paid as on a new prompt pair.

Paddle backends run with riffusion.cpu_tuning as the riffusion commands do (RIFFUSION_CPU_TUNING=0: without).

Backends (each in a child process of its own, so peak RSS is per backend and no two share thread pools):
  torch        diffusers StableDiffusionImg2ImgPipeline with the same scheduler, lerped prompt
               embeddings, our audio path
  dynamic      Paddle dynamic mode (ppdiffusers)
  static-fp32, static-bf16, static-int8    Paddle Inference (oneDNN) programs of EXPORT
  onnx-fp32, onnx-int8                     onnxruntime models of EXPORT
A backend the export or the CPU does not have prints the reason instead of a row. Every backend runs
one untimed 2-step request first (oneDNN and onnxruntime build their kernels on first use), then the
timed one. Ratios are to torch (else Paddle dynamic) measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import _cores, run_child  # noqa: E402

BACKENDS = ("torch", "dynamic", "static-fp32", "static-bf16", "static-int8", "onnx-fp32", "onnx-int8")
STAGES = ("text_encoding", "vae_encode", "unet", "vae_decode", "audio", "mp3")
START = dict(prompt="church bells on sunday", seed=42, denoising=0.75, guidance=7.0)
END = dict(prompt="jazz with piano", seed=123, denoising=0.75, guidance=7.0)
ALPHA = 0.5
WARMUP_STEPS = 2  # at denoising 0.75 one step would leave img2img no step to run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="converted ppdiffusers library")
    p.add_argument("--torch", type=Path, help="the torch diffusers repo the library was converted from")
    p.add_argument("--export", type=Path, help="a `python -m export` folder (needed by the static/onnx backends)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50, riffusion-app's)")
    p.add_argument("--scheduler", choices=("library", "dpmsolver++"), default="library",
                   help="the library's own scheduler (PNDM for riffusion) or DPM-Solver++ (default: library)")
    p.add_argument("--threads", type=int, help="CPU threads per backend (default: all cores)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps {args.steps}: must be at least 1", file=sys.stderr)
        return 2
    for name in ("model", "torch", "export"):  # the children run in the checkout's root
        path = getattr(args, name)
        if path is not None and not path.is_dir():
            print(f"error: --{name} {path}: not a folder", file=sys.stderr)
            return 2
        if path is not None:
            setattr(args, name, path.absolute())
    if args.worker:
        return worker(args)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        print(f"error: unknown backend {unknown[0]!r} (choose from {','.join(BACKENDS)})", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    results = {"steps": args.steps, "scheduler": args.scheduler, "threads": args.threads or _cores(),
               "load_average_at_start": os.getloadavg(), "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-app-") as scratch:
        for backend in backends:
            if backend == "torch" and args.torch is None:
                results["backends"][backend] = {"error": "no --torch repo given"}
                continue
            print(f"{backend} ...", file=sys.stderr, flush=True)
            output = Path(scratch) / f"{backend}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--output", str(output),
                       "--model", str(args.model), "--steps", str(args.steps), "--scheduler", args.scheduler]
            command += ["--torch", str(args.torch)] if args.torch else []
            command += ["--export", str(args.export)] if args.export else []
            command += ["--threads", str(args.threads)] if args.threads else []
            status, seconds, rss, log = run_child(command, env)
            if status != 0 or not output.is_file():
                lines = [line for line in log.strip().splitlines() if line.strip()]
                results["backends"][backend] = {"error": lines[-1] if lines else "no output"}
                continue
            entry = json.loads(output.read_text())
            entry["peak_rss_gb"] = round(rss, 2)
            results["backends"][backend] = entry
    reference = "torch" if "total_s" in results["backends"].get("torch", {}) else "dynamic"
    base = results["backends"].get(reference, {})
    for entry in results["backends"].values():
        if "total_s" in entry and "total_s" in base:
            entry["ratio"] = round(entry["total_s"] / base["total_s"], 3)
            entry["unet_step_ratio"] = round(entry["unet_step_s"] / base["unet_step_s"], 3)
    results["reference"] = reference
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict) -> None:
    reference = results["reference"]
    load = results["load_average_at_start"]
    print(f"riffusion-app request: {results['steps']} steps, scheduler {results['scheduler']}, alpha {ALPHA}, "
          f"{results['threads']} threads; load average at start {load[0]:.1f} (a shared machine: compare ratios)")
    header = (f"{'backend':12} {'load s':>7} {'text s':>7} {'enc s':>6} {'UNet s':>7} {'/step':>6} {'dec s':>6} "
              f"{'audio s':>7} {'mp3 s':>6} {'total s':>8} {'x ' + reference:>9} {'step x':>7} {'RSS GB':>7}")
    print(header)
    for backend, entry in results["backends"].items():
        if "error" in entry:
            print(f"{backend:12} not run: {entry['error']}")
            continue
        stage = entry["stages_s"]
        ratio = f"{entry['ratio']:.2f}" if "ratio" in entry else "-"
        step_ratio = f"{entry['unet_step_ratio']:.2f}" if "unet_step_ratio" in entry else "-"
        print(f"{backend:12} {entry['load_s']:7.1f} {stage['text_encoding']:7.2f} {stage['vae_encode']:6.2f} "
              f"{stage['unet']:7.1f} {entry['unet_step_s']:6.2f} {stage['vae_decode']:6.2f} {stage['audio']:7.2f} "
              f"{stage['mp3']:6.2f} {entry['total_s']:8.1f} {ratio:>9} {step_ratio:>7} {entry['peak_rss_gb']:7.2f}")


# --- child: one backend ---------------------------------------------------------------------------


def worker(args) -> int:
    from riffusion import seed_images

    started = time.perf_counter()
    request, info = LOADERS[args.worker.split("-")[0]](args)
    load_s = time.perf_counter() - started
    side = info.pop("side")
    seed = seed_images.load("og_beat").convert("RGB").resize((side, side))
    request(seed, WARMUP_STEPS, {name: [] for name in STAGES})  # kernels are built on first use
    stages = {name: [] for name in STAGES}
    started = time.perf_counter()
    unet_calls = request(seed, args.steps, stages)
    total = time.perf_counter() - started
    seconds = {name: round(sum(times), 6) for name, times in stages.items()}
    args.output.write_text(json.dumps({
        "load_s": round(load_s, 2), "total_s": round(total, 3), "stages_s": seconds, "unet_calls": unet_calls,
        "unet_step_s": round(seconds["unet"] / max(unet_calls, 1), 6), **info}))
    return 0


def _finish(image, stages) -> None:
    """Spectrogram image -> audio -> MP3, as the server answers."""
    from riffusion.audio import image_to_audio, without_clipping, write_audio

    from export.fidelity import spectrogram_params

    with _timed(stages["audio"]):
        audio, sample_rate = image_to_audio(image, spectrogram_params(image.height))
    with _timed(stages["mp3"]):
        write_audio(io.BytesIO(), without_clipping(audio), sample_rate, format="MP3")


class _timed:
    def __init__(self, bucket: list):
        self.bucket = bucket

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.bucket.append(time.perf_counter() - self.started)


def _wrap(owner, method: str, stages: dict, stage: str) -> None:
    """Time every call of owner.method into stages[stage] (the dict is looked up at call time)."""
    original = getattr(owner, method)

    def timed(*args, **kwargs):
        with _timed(stages["current"][stage]):
            return original(*args, **kwargs)

    setattr(owner, method, timed)


def _hook(layer, stages: dict, stage: str) -> None:
    """Time every forward of a paddle Layer into stages[stage] (a Layer's forward cannot be replaced)."""
    def before(*_):
        layer._bench_started = time.perf_counter()

    def after(*_):
        stages["current"][stage].append(time.perf_counter() - layer._bench_started)

    layer.register_forward_pre_hook(before)
    layer.register_forward_post_hook(after)


def _paddle(args):
    from riffusion.cpu_tuning import tune_cpu_runtime

    tune_cpu_runtime()  # as the riffusion commands run
    import paddle

    from riffusion.pipeline import PromptInput, RiffusionPipeline

    backend = args.worker
    runtime, _, precision = backend.partition("-")
    if runtime != "dynamic" and args.export is None:
        raise SystemExit(f"{backend} needs --export")
    if runtime == "static" and precision == "int8":
        raise SystemExit("Paddle Inference int8 needs a program quantized by PaddleSlim; this export's int8 is "
                         "onnxruntime's (onnx-int8)")
    pipe = RiffusionPipeline.from_pretrained(str(args.model), exported=str(args.export) if args.export else None,
                                             runtime=runtime, precision=precision or None, scheduler=args.scheduler)
    inner = pipe.pipe
    stages = {"current": None}
    parts = [(inner.text_encoder, "text_encoding"), (inner.unet, "unet")]
    for part, stage in parts:
        if hasattr(part, "session"):  # exported: time the session
            _wrap(part.session, "run", stages, stage)
        else:  # a paddle Layer
            _hook(part, stages, stage)
    _wrap(inner.vae, "encode", stages, "vae_encode")
    _wrap(inner.vae, "decode", stages, "vae_decode")
    def request(seed, steps, buckets):
        stages["current"] = buckets
        pipe.clear_prompt_cache()
        with paddle.no_grad():
            image = pipe.interpolate(PromptInput(**START), PromptInput(**END), ALPHA, seed, num_inference_steps=steps)
        _finish(image, buckets)
        return len(buckets["unet"])

    side = inner.unet.config.get("sample_size", 64) * pipe.vae_scale
    return request, {"paddle": paddle.__version__, "runtime": runtime, "precision": precision or "fp32", "side": side}


def _torch(args):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    torch.set_num_threads(args.threads or _cores())
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(args.torch), safety_checker=None, requires_safety_checker=False)
    if args.scheduler == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    stages = {"current": None}
    _wrap(pipe.unet, "forward", stages, "unet")
    _wrap(pipe.vae, "encode", stages, "vae_encode")
    _wrap(pipe.vae, "decode", stages, "vae_decode")

    def embed(prompt):
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with _timed(stages["current"]["text_encoding"]):
            return pipe.text_encoder(ids)[0]

    def request(seed, steps, buckets):
        stages["current"] = buckets
        with torch.no_grad():
            text = torch.lerp(embed(START["prompt"]), embed(END["prompt"]), ALPHA)
            uncond = torch.lerp(embed(""), embed(""), ALPHA)
            image = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, image=seed, strength=START["denoising"],
                         guidance_scale=START["guidance"], num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(START["seed"])).images[0]
        _finish(image, buckets)
        return len(buckets["unet"])

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return request, {"torch": torch.__version__, "side": side}


LOADERS = {"torch": _torch, "dynamic": _paddle, "static": _paddle, "onnx": _paddle}


if __name__ == "__main__":
    sys.exit(main())
