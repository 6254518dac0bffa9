"""Seconds per LoRA optimizer step and peak RSS: our Paddle trainer (riffusion.train) against a diffusers +
peft LoRA loop on torch, same model, data, rank, targets and fp32, measured in the same run.

    python scripts/bench_train.py --paddle LIBRARY --torch TORCH_REPO [--steps 2] [--latent 64]

LIBRARY is a converted library, TORCH_REPO the torch repo it came from (`python -m convert.builtin --size full`
then `python -m convert`: full size is the default the issue asks for). One 512x512 spectrogram (the og_beat
seed image, --latent 64) with one caption, LoRA rank 4 on to_q/to_k/to_v/to_out.0, batch 1, AdamW. Each side
runs in a child process of its own (peak RSS is per side; a child above --max-rss-gb is stopped and reported).
The first step is a warm-up; the median of --steps timed steps counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAPTION = "a funky drum loop"


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def write_dataset(folder: Path, latent: int) -> Path:
    from riffusion import seed_images

    image = seed_images.load("og_beat").convert("RGB").resize((latent * 8, latent * 8))
    (folder / "images").mkdir(parents=True)
    image.save(folder / "images" / "clip.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "images/clip.png", "text": CAPTION}) + "\n")
    return folder


def paddle_side(library: Path, data: Path, steps: int, variant: str = "tuned") -> dict:
    from riffusion.train import Trainer, TrainConfig, tune_cpu_runtime

    if variant == "tuned":  # what python -m riffusion.train does
        tune_cpu_runtime()
    trainer = Trainer(TrainConfig(str(library), str(data), rank=4, targets=TARGETS, batch_size=1, lr=1e-4),
                      attention="blockwise" if variant == "tuned" else "stock")
    times = []
    for step in range(steps + 1):
        began = time.perf_counter()
        trainer.step(step)
        times.append(time.perf_counter() - began)
    return {"times": times[1:]}


def torch_side(repo: Path, data: Path, steps: int) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(repo), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(repo), subfolder="vae")
    text = CLIPTextModel.from_pretrained(str(repo), subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(str(repo), subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(str(repo), subfolder="scheduler")
    for model in (unet, vae, text):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-2)
    image = np.asarray(Image.open(data / "images" / "clip.png").convert("RGB"), dtype=np.float32) / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(image.transpose(2, 0, 1)[None])).latent_dist
        ids = tokenizer(CAPTION, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text(ids)[0]
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        latents = posterior.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
    return {"times": times[1:]}


def run_watched(command: list[str], max_rss_gb: float, stderr=None, env: dict | None = None) -> dict:
    """Run a benchmark child that prints its result as JSON on its last stdout line; kill it above
    `max_rss_gb` of RSS. The result, or {"error": ...}."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    stopped = {}

    def watch():
        child = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                rss = child.memory_info().rss / 2**30
            except psutil.Error:
                return
            if rss > max_rss_gb:
                stopped["rss_gb"] = rss
                process.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    watcher.join()
    if stopped:
        return {"error": f"stopped at {stopped['rss_gb']:.1f} GB RSS (--max-rss-gb {max_rss_gb})"}
    if process.returncode != 0:
        return {"error": f"exit status {process.returncode}"}
    return json.loads(output.strip().splitlines()[-1])


def run_child(side: str, args, data: Path) -> dict:
    """Run one side in a child; stop it above --max-rss-gb."""
    command = [sys.executable, __file__, "--worker", side, "--data", str(data), "--paddle", str(args.paddle),
               "--torch", str(args.torch), "--steps", str(args.steps), "--paddle-variant", args.paddle_variant]
    began = time.perf_counter()
    result = run_watched(command, args.max_rss_gb)
    if "error" not in result:
        result["wall_s"] = time.perf_counter() - began
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paddle", type=Path, required=True, help="converted library")
    p.add_argument("--torch", type=Path, required=True, help="the torch repo it was converted from")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps after one warm-up step")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 images)")
    p.add_argument("--max-rss-gb", type=float, default=16.0, help="stop a side whose RSS passes this")
    p.add_argument("--paddle-variant", choices=("tuned", "stock"), default="tuned",
                   help="tuned: the trainer as python -m riffusion.train runs it; stock: ppdiffusers' attention "
                        "and Paddle's default CPU runtime (the trainer before riffusion.attention and "
                        "tune_cpu_runtime), to measure against")
    p.add_argument("--worker", choices=("paddle", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (paddle_side(args.paddle, args.data, args.steps, args.paddle_variant) if args.worker == "paddle"
                  else torch_side(args.torch, args.data, args.steps))
        result["peak_rss_gb"] = _peak_rss_gb()
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as work:
        data = write_dataset(Path(work) / "data", args.latent)
        results = {side: run_child(side, args, data) for side in ("torch", "paddle")}
    print(f"LoRA rank 4 training step, batch 1, {args.latent * 8}x{args.latent * 8}, fp32, CPU; median of {args.steps}; "
          f"paddle {args.paddle_variant}")
    for side, result in results.items():
        if "error" in result:
            print(f"{side:8s} {result['error']}")
        else:
            print(f"{side:8s} {statistics.median(result['times']):8.2f} s/step  peak RSS {result['peak_rss_gb']:.2f} GB"
                  f"  (steps {', '.join(f'{t:.2f}' for t in result['times'])})")
    if all("error" not in result for result in results.values()):
        time_ratio = statistics.median(results["paddle"]["times"]) / statistics.median(results["torch"]["times"])
        rss_ratio = results["paddle"]["peak_rss_gb"] / results["torch"]["peak_rss_gb"]
        print(f"paddle / torch: {time_ratio:.2f}x time per step, {rss_ratio:.2f}x peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
