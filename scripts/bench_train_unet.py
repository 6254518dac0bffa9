"""One LoRA training step of a random-weight, full-width SD 1.5 UNet on the CPU: Paddle (our trainer's
attention variants) against diffusers + peft on torch, every side in a child process of its own, the sides
run in turns (A, B, C, A, B, C, ...) so that load from other work on the machine hits them alike.

    python scripts/bench_train_unet.py [--latent 32] [--layers-per-block 2] [--rounds 2] [--steps 2]

What bench_train.py measures, less the data pipeline, text encoder and VAE (the step is the UNet's forward,
backward and AdamW), so it runs where the full library does not fit in memory: --layers-per-block 1
keeps every width and attention size of the full UNet with about half its weights. The step: LoRA rank 4
on to_q/to_k/to_v/to_out.0, batch 1, fp32, MSE against random noise, random context [1, 77, 768].
Paddle sides: "stock" (ppdiffusers' AttnProcessor), "blockwise" (riffusion.attention), and either with
"+tuned" (riffusion.train.tune_cpu_runtime: MKL's fast path on AMD, glibc reusing freed memory, torch kept
out of the process). Prints each side's median seconds per step, peak RSS and the ratios to torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import run_watched  # noqa: E402

SIDES = ("torch", "paddle-stock", "paddle-blockwise", "paddle-stock+tuned", "paddle-blockwise+tuned")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _config(layers_per_block: int) -> dict:
    from convert.builtin import unet_config

    config = unet_config("full")
    config["layers_per_block"] = layers_per_block
    return {key: value for key, value in config.items() if not key.startswith("_")}


def paddle_side(kind: str, latent: int, config: dict, steps: int) -> list[float]:
    if kind.endswith("+tuned"):
        from riffusion.train import tune_cpu_runtime

        tune_cpu_runtime()
    import numpy as np
    import paddle
    from ppdiffusers import UNet2DConditionModel

    from export.runtime import use_all_cores
    from riffusion import lora

    use_all_cores()
    paddle.seed(0)
    unet = UNet2DConditionModel(**config)
    unet.eval()
    for parameter in unet.parameters():
        parameter.stop_gradient = True
    layers = lora.add_unet_lora(unet, 4, 4.0, TARGETS)
    parameters = [p for layer in layers.values() for p in layer.parameters()]
    for parameter in parameters:
        parameter.stop_gradient = False
    if kind.startswith("paddle-blockwise"):
        from riffusion.attention import use_blockwise_attention

        use_blockwise_attention(unet)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=parameters, weight_decay=1e-2,
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    rng = np.random.default_rng(0)
    context = paddle.to_tensor(rng.standard_normal((1, 77, 768), dtype=np.float32))
    times = []
    for _ in range(steps + 1):
        sample = paddle.to_tensor(rng.standard_normal((1, 4, latent, latent), dtype=np.float32))
        noise = paddle.to_tensor(rng.standard_normal((1, 4, latent, latent), dtype=np.float32))
        began = time.perf_counter()
        prediction = unet(sample, paddle.to_tensor([500], dtype="int64"), encoder_hidden_states=context).sample
        paddle.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.clear_grad()
        times.append(time.perf_counter() - began)
    return times[1:]


def torch_side(latent: int, config: dict, steps: int) -> list[float]:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from export.runtime import cpu_count

    torch.set_num_threads(cpu_count())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-2)
    context = torch.randn(1, 77, 768)
    times = []
    for _ in range(steps + 1):
        sample, noise = torch.randn(1, 4, latent, latent), torch.randn(1, 4, latent, latent)
        began = time.perf_counter()
        prediction = unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
    return times[1:]


def run_child(side: str, args) -> dict:
    """One side in a child process; stopped above --max-rss-gb."""
    command = [sys.executable, __file__, "--worker", side, "--latent", str(args.latent), "--steps", str(args.steps),
               "--config", json.dumps(_config(args.layers_per_block))]  # convert.builtin imports torch
    return run_watched(command, args.max_rss_gb, stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (64: 512x512 images)")
    p.add_argument("--layers-per-block", type=int, default=2, help="2: SD 1.5; 1: same widths, half the weights")
    p.add_argument("--steps", type=int, default=2, help="timed steps per child after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="children per side, run in turns")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--max-rss-gb", type=float, default=16.0, help="stop a side whose RSS passes this")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--config", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        times = (torch_side(args.latent, args.config, args.steps) if args.worker == "torch"
                 else paddle_side(args.worker, args.latent, args.config, args.steps))
        print(json.dumps({"times": times, "peak_rss_gb": _peak_rss_gb(), "torch_loaded": "torch" in sys.modules}))
        return 0
    sides = args.sides.split(",")
    unknown = [side for side in sides if side not in SIDES]
    if unknown:
        print(f"error: unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}", file=sys.stderr)
        return 1
    results = {side: {"times": [], "peak_rss_gb": 0.0, "errors": []} for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            result = run_child(side, args)
            if "error" in result:
                results[side]["errors"].append(result["error"])
            else:
                results[side]["times"] += result["times"]
                results[side]["peak_rss_gb"] = max(results[side]["peak_rss_gb"], result["peak_rss_gb"])
            print(f"  {side}: {result}", flush=True)
    print(f"LoRA rank 4 UNet training step, full width, layers_per_block {args.layers_per_block}, latent "
          f"{args.latent}x{args.latent}, batch 1, fp32, CPU; median of {args.rounds} x {args.steps} steps")
    base = results.get("torch")
    for side, result in results.items():
        if not result["times"]:
            print(f"{side:24s} {'; '.join(result['errors'])}")
            continue
        median = statistics.median(result["times"])
        line = f"{side:24s} {median:7.2f} s/step  peak RSS {result['peak_rss_gb']:.2f} GB"
        if base and base["times"] and side != "torch":
            line += (f"  / torch: {median / statistics.median(base['times']):.2f}x time, "
                     f"{result['peak_rss_gb'] / base['peak_rss_gb']:.2f}x RSS")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
